"""dlib's small dense linear algebra in plain Python floats, for bit-compatible chip geometry.

Line-by-line ports from dlib 20.0.1 (matrix/matrix_la.h: svd4, pinv; geometry/point_transforms.h:
find_similarity_transform), with dlib's operation order, so that the face chip's transform has
the same rounding as dlib's: numpy's LAPACK SVD differs in the last bits, which flips truncated
chip pixels that sit exactly on an integer. The face chip (server/vision/alignment.py) uses them;
matrices are lists of rows, points (x, y) pairs.
"""
from __future__ import annotations

import math


def svd(a: list[list[float]]) -> tuple[list[list[float]], list[float], list[list[float]]]:
    """dlib svd4(SVD_SKINNY_U, withv=true): a (m x n, m >= n) = u diag(q) v^T (Golub-Reinsch)."""
    m = len(a)
    n = len(a[0])
    eps = 2.220446049250313e-16
    tol = 2.2250738585072014e-308 / eps
    u = [list(map(float, row)) for row in a]
    q = [0.0] * n
    e = [0.0] * n
    v = [[0.0] * n for _ in range(n)]
    g = x = 0.0
    l = 0
    for i in range(n):
        e[i] = g
        s = 0.0
        l = i + 1
        for j in range(i, m):
            s += u[j][i] * u[j][i]
        if s < tol:
            g = 0.0
        else:
            f = u[i][i]
            g = math.sqrt(s) if f < 0 else -math.sqrt(s)
            h = f * g - s
            u[i][i] = f - g
            for j in range(l, n):
                s = 0.0
                for k in range(i, m):
                    s += u[k][i] * u[k][j]
                f = s / h
                for k in range(i, m):
                    u[k][j] += f * u[k][i]
        q[i] = g
        s = 0.0
        for j in range(l, n):
            s += u[i][j] * u[i][j]
        if s < tol:
            g = 0.0
        else:
            f = u[i][i + 1]
            g = math.sqrt(s) if f < 0 else -math.sqrt(s)
            h = f * g - s
            u[i][i + 1] = f - g
            for j in range(l, n):
                e[j] = u[i][j] / h
            for j in range(l, m):
                s = 0.0
                for k in range(l, n):
                    s += u[j][k] * u[i][k]
                for k in range(l, n):
                    u[j][k] += s * e[k]
        y = abs(q[i]) + abs(e[i])
        if y > x:
            x = y
    # right-hand transformations
    for i in range(n - 1, -1, -1):
        if g != 0.0:
            h = u[i][i + 1] * g
            for j in range(l, n):
                v[j][i] = u[i][j] / h
            for j in range(l, n):
                s = 0.0
                for k in range(l, n):
                    s += u[i][k] * v[k][j]
                for k in range(l, n):
                    v[k][j] += s * v[k][i]
        for j in range(l, n):
            v[i][j] = v[j][i] = 0.0
        v[i][i] = 1.0
        g = e[i]
        l = i
    # left-hand transformations (skinny u: m x n, nothing to pad when m == n)
    for i in range(n - 1, -1, -1):
        l = i + 1
        g = q[i]
        for j in range(l, n):
            u[i][j] = 0.0
        if g != 0.0:
            h = u[i][i] * g
            for j in range(l, n):
                s = 0.0
                for k in range(l, m):
                    s += u[k][i] * u[k][j]
                f = s / h
                for k in range(i, m):
                    u[k][j] += f * u[k][i]
            for j in range(i, m):
                u[j][i] /= g
        else:
            for j in range(i, m):
                u[j][i] = 0.0
        u[i][i] += 1.0
    # diagonalisation of the bidiagonal form
    eps *= x
    for k in range(n - 1, -1, -1):
        iters = 0
        while True:  # test_f_splitting
            cancel = False
            for l in range(k, -1, -1):
                if abs(e[l]) <= eps:
                    break
                if abs(q[l - 1]) <= eps:
                    cancel = True
                    break
            if cancel:
                c = 0.0
                s = 1.0
                l1 = l - 1
                for i in range(l, k + 1):
                    f = s * e[i]
                    e[i] *= c
                    if abs(f) <= eps:
                        break
                    g = q[i]
                    h = q[i] = math.sqrt(f * f + g * g)
                    c = g / h
                    s = -f / h
                    for j in range(m):
                        y = u[j][l1]
                        z = u[j][i]
                        u[j][l1] = y * c + z * s
                        u[j][i] = -y * s + z * c
            # test_f_convergence
            z = q[k]
            if l == k:
                break  # convergence
            iters += 1
            if iters > 300:
                raise ArithmeticError("dlib svd did not converge")
            x = q[l]
            y = q[k - 1]
            g = e[k - 1]
            h = e[k]
            f = ((y - z) * (y + z) + (g - h) * (g + h)) / (2 * h * y)
            g = math.sqrt(f * f + 1.0)
            f = ((x - z) * (x + z) + h * (y / ((f - g) if f < 0 else (f + g)) - h)) / x
            c = s = 1.0
            for i in range(l + 1, k + 1):
                g = e[i]
                y = q[i]
                h = s * g
                g *= c
                e[i - 1] = z = math.sqrt(f * f + h * h)
                c = f / z
                s = h / z
                f = x * c + g * s
                g = -x * s + g * c
                h = y * s
                y *= c
                for j in range(n):
                    x = v[j][i - 1]
                    z = v[j][i]
                    v[j][i - 1] = x * c + z * s
                    v[j][i] = -x * s + z * c
                q[i - 1] = z = math.sqrt(f * f + h * h)
                if z != 0:
                    c = f / z
                    s = h / z
                f = c * g + s * y
                x = -s * g + c * y
                for j in range(m):
                    y = u[j][i - 1]
                    z = u[j][i]
                    u[j][i - 1] = y * c + z * s
                    u[j][i] = -y * s + z * c
            e[l] = 0.0
            e[k] = f
            q[k] = x
        # convergence
        if z < 0.0:
            q[k] = -z
            for j in range(n):
                v[j][k] = -v[j][k]
    return u, q, v


def matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """dlib's small-matrix product: each entry summed left to right."""
    out = []
    for row in a:
        out_row = []
        for j in range(len(b[0])):
            acc = row[0] * b[0][j]
            for k in range(1, len(b)):
                acc += row[k] * b[k][j]
            out_row.append(acc)
        out.append(out_row)
    return out


def pinv(m: list[list[float]]) -> list[list[float]]:
    """dlib pinv() of a matrix with nr >= nc: v * diag(1/w, tiny w -> 0) * u^T."""
    u, w, v = svd(m)
    eps = 2.220446049250313e-16 * max(len(m), len(m[0])) * max(w)
    rw = [(1 / x) if (x >= eps or x <= -eps) else 0.0 for x in w]
    scaled = [[v[r][c] * rw[c] for c in range(len(w))] for r in range(len(v))]
    return matmul(scaled, [list(col) for col in zip(*u)])


def similarity_transform(from_pts, to_pts) -> tuple[list[list[float]], list[float]]:
    """dlib find_similarity_transform for one point set, with dlib's operation order."""
    n = len(from_pts)
    mf = [0.0, 0.0]
    mt = [0.0, 0.0]
    for p, q in zip(from_pts, to_pts):
        mf[0] += p[0]
        mf[1] += p[1]
        mt[0] += q[0]
        mt[1] += q[1]
    mf = [mf[0] / n, mf[1] / n]  # dlib::vector /= divides
    mt = [mt[0] / n, mt[1] / n]
    sigma_from = 0.0
    cov = [[0.0, 0.0], [0.0, 0.0]]
    for p, q in zip(from_pts, to_pts):
        dx, dy = p[0] - mf[0], p[1] - mf[1]
        tx, ty = q[0] - mt[0], q[1] - mt[1]
        sigma_from += dx * dx + dy * dy
        cov[0][0] += tx * dx
        cov[0][1] += tx * dy
        cov[1][0] += ty * dx
        cov[1][1] += ty * dy
    sigma_from /= n
    inv_n = 1.0 / n  # dlib matrix /= scalar multiplies by the reciprocal
    cov = [[c * inv_n for c in row] for row in cov]
    u, d, v = svd(cov)
    s = [1.0, 1.0]

    def det(m):
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]

    det_cov = det(cov)
    if det_cov < 0 or (det_cov == 0 and det(u) * det(v) < 0):
        if d[1] < d[0]:
            s[1] = -1.0
        else:
            s[0] = -1.0
    us = [[u[i][j] * s[j] for j in range(2)] for i in range(2)]
    r = matmul(us, [list(col) for col in zip(*v)])
    c = 1.0
    if sigma_from != 0:
        c = 1.0 / sigma_from * (d[0] * s[0] + d[1] * s[1])
    m = [[r[i][j] * c for j in range(2)] for i in range(2)]
    t = [mt[i] - (m[i][0] * mf[0] + m[i][1] * mf[1]) for i in range(2)]
    return m, t
