"""Compiled (numba) loops of the alignment step: dlib's shape predictor and its bilinear chip warp.

They replay, value for value, the numpy code they replaced (and so dlib): the same float32 and
float64 operations in the same order. What they save is numpy's per-call overhead on small arrays
(a 5-point cascade is 15 levels x 500 trees of depth 4 on 800 pixels; a chip 150 x 150 pixels) and
the GIL: they run with it released, so the requests' threads align faces side by side while
the models run. Compiled on first use (~1.6 s; `warm_up`, which the pipeline calls when it loads, so
that no request pays it) and cached beside this file or in the user's cache directory (numba's
`cache=True`); where neither can be written, compiled anew in each process.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


def _compiled(fn):
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # numba found nowhere to write its cache (read-only install and home)
        return njit(nogil=True)(fn)


@_compiled
def predict_shapes(image, rects, initial, init_centred, init_sigma, anchor_idx, delta_x, delta_y,
                   split_idx1, split_idx2, thresh, leaves, depth):  # pragma: no cover - compiled
    """(n, parts, 2) float64 dlib landmarks (rounded) of n rects (left, top, right, bottom).

    image: (H, W, C) uint8, C 1 (dlib's intensity) or 3 (RGB -> gray as (r+g+b)//3);
    initial: (2*parts,) float32 x0, y0, x1, ...; init_centred: (parts, 2) float64, init_sigma its
    squared norm; anchor_idx, delta_x, delta_y: (L, P); split_idx1/2, thresh: (L, T, S);
    leaves: (L, T, S+1, 2*parts) float32.
    """
    h, w, channels = image.shape
    n = rects.shape[0]
    parts = initial.shape[0] // 2
    levels, trees, splits = split_idx1.shape
    pixels = anchor_idx.shape[1]
    out = np.empty((n, parts, 2), np.float64)
    cur = np.empty(2 * parts, np.float32)
    feat = np.empty(pixels, np.float32)
    for i in range(n):
        left = rects[i, 0]
        top = rects[i, 1]
        width = rects[i, 2] - left
        height = rects[i, 3] - top
        for j in range(2 * parts):
            cur[j] = initial[j]
        for level in range(levels):
            # the 2x2 part of dlib's similarity initial -> current, in closed form: it equals dlib's
            # Umeyama/SVD result (a rotation times a scale) up to the last bits, which float32 absorbs
            mx = 0.0
            my = 0.0
            for k in range(parts):
                mx += np.float64(cur[2 * k])
                my += np.float64(cur[2 * k + 1])
            mx /= parts
            my /= parts
            sxx = 0.0
            syy = 0.0
            syx = 0.0
            sxy = 0.0
            for k in range(parts):
                tx = np.float64(cur[2 * k]) - mx
                ty = np.float64(cur[2 * k + 1]) - my
                sxx += tx * init_centred[k, 0]
                syy += ty * init_centred[k, 1]
                syx += ty * init_centred[k, 0]
                sxy += tx * init_centred[k, 1]
            a = (sxx + syy) / init_sigma
            b = (syx - sxy) / init_sigma
            m00 = np.float32(a)
            m01 = np.float32(-b)
            m10 = np.float32(b)
            m11 = np.float32(a)
            for p in range(pixels):
                an = anchor_idx[level, p]
                dx = delta_x[level, p]
                dy = delta_y[level, p]
                px = m00 * dx + m01 * dy + cur[2 * an]  # float32, dlib's order
                py = m10 * dx + m11 * dy + cur[2 * an + 1]
                x = math.floor(np.float64(px) * width + left + 0.5)
                y = math.floor(np.float64(py) * height + top + 0.5)
                if x >= 0 and x < w and y >= 0 and y < h:
                    yi = int(y)
                    xi = int(x)
                    if channels == 1:
                        feat[p] = np.float32(image[yi, xi, 0])
                    else:
                        total = np.int64(image[yi, xi, 0]) + np.int64(image[yi, xi, 1]) + np.int64(image[yi, xi, 2])
                        feat[p] = np.float32(total // 3)
                else:
                    feat[p] = np.float32(0.0)
            for t in range(trees):
                node = 0
                for _ in range(depth):
                    go_left = (feat[split_idx1[level, t, node]] - feat[split_idx2[level, t, node]]) > thresh[level, t, node]
                    node = 2 * node + 2 - (1 if go_left else 0)
                leaf = node - splits
                for j in range(2 * parts):  # the trees' leaves added one after another, float32
                    cur[j] = cur[j] + leaves[level, t, leaf, j]
        for k in range(parts):
            out[i, k, 0] = math.floor(np.float64(cur[2 * k]) * width + left + 0.5)
            out[i, k, 1] = math.floor(np.float64(cur[2 * k + 1]) * height + top + 0.5)
    return out


@_compiled
def sample_bilinear(src, m00, m01, m10, m11, b0, b1, rows, cols, top0, left0, h, w):  # pragma: no cover
    """dlib transform_image with interpolate_bilinear over the window (top0, left0, h, w) of src
    (H, W, C) uint8: truncated values, 0 unless the whole 2x2 cell is inside. (rows, cols, C) uint8."""
    channels = src.shape[2]
    out = np.zeros((rows, cols, channels), np.uint8)
    for r in range(rows):
        fr = np.float64(r)
        for c in range(cols):
            fc = np.float64(c)
            x = m00 * fc + m01 * fr + b0
            y = m10 * fc + m11 * fr + b1
            left = math.floor(x)
            top = math.floor(y)
            if not (left >= 0 and top >= 0 and left + 1 < w and top + 1 < h):
                continue
            lr = x - left
            tb = y - top
            one_lr = 1 - lr
            li = int(left) + left0
            ti = int(top) + top0
            for ch in range(channels):
                tl = np.float64(src[ti, li, ch])
                tr = np.float64(src[ti, li + 1, ch])
                bl = np.float64(src[ti + 1, li, ch])
                br = np.float64(src[ti + 1, li + 1, ch])
                val = (1 - tb) * (one_lr * tl + lr * tr) + tb * (one_lr * bl + lr * br)
                out[r, c, ch] = np.uint8(val)
    return out


def warm_up(predictor) -> None:
    """Compile (or load from numba's cache) both loops for the arrays the pipeline passes."""
    from server.vision.alignment import face_chips

    image = np.zeros((16, 16, 3), np.uint8)
    face_chips(image, predictor.predict_many(image, [(2, 2, 13, 13)]))
