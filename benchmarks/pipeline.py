"""Benchmarks and accuracy on the dev set.

    python -m benchmarks.pipeline pipeline [--facedata ../shared/facedata/dev] [--threads 2] [--out FILE.json]

Prints markdown tables: embedder faces/s by batch size, detector median ms by image, verification
accuracy / ROC AUC on pairs.csv (per source), detection recall / precision on detection_gt.json,
and the similarity calibration (c0, c1) used by the API.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_FACEDATA, fit_image, markdown_table
from server.config import Settings
from server.wiring import build_inference, open_backend


def _median_ms(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def bench_embedder(pipeline, batches=(1, 8, 32, 64), seconds: float = 3.0) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n in batches:
        chips = rng.integers(0, 256, (n, 150, 150, 3), dtype=np.uint8)
        pipeline.embed_chips(chips)
        reps = max(3, int(seconds * 300 / n / 10))
        ms = _median_ms(lambda: pipeline.embed_chips(chips), reps)
        rows.append({"batch": n, "ms_per_batch": ms, "faces_per_s": n / ms * 1000.0})
    return rows


def detector_images(facedata: Path | None) -> dict[str, np.ndarray]:
    from server.vision.decode import decode_image

    if facedata and facedata.is_dir():
        one = decode_image((facedata / "deepface/tests/unit/dataset/img2.jpg").read_bytes())
        many = decode_image((facedata / "CompreFace/embedding-calculator/sample_images/015_6.jpg").read_bytes())
    else:  # no dev photos: the astronaut alone and tiled
        from skimage.data import astronaut

        one = astronaut()
        many = np.tile(astronaut()[::2, ::2], (2, 3, 1))
    return {
        "640x480, 1 face": fit_image(one, 640, 480),
        "640x480, many faces": fit_image(many, 640, 480),
        "1920x1080, 1 face": fit_image(one, 1920, 1080),
        "1920x1080, many faces": fit_image(many, 1920, 1080),
    }


def bench_detector(pipeline, images: dict[str, np.ndarray], repeat: int = 15) -> list[dict]:
    rows = []
    for name, img in images.items():
        det = pipeline.detector.detect(img)
        n = int((det.probs > 0.85).sum())
        rows.append({"image": name, "faces": n, "detect_ms": _median_ms(lambda: pipeline.detector.detect(img), repeat),
                     "faces_call_ms": _median_ms(lambda: pipeline.faces(img), max(5, repeat // 2))})
    return rows


# ---------------------------------------------------------------- verification


def describe_images(pipeline, facedata: Path, names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Largest face per image, by the cascade of dlib's baseline (HOG up 1 -> HOG up 2 -> CNN MMOD
    -> whole image) with MTCNN in HOG's place: MTCNN at thresholds 0.85, 0.5, 0, then dlib's CNN
    MMOD detector (the same model dlib's baseline falls back to), then the whole image as the face
    rect, aligned by the 5-point predictor (dlib's "whole-image rect")."""
    from server.vision.decode import decode_image
    from server.vision.pipeline import FacePipeline
    from server.vision.mmod import MmodDetector

    # MTCNN alone for the threshold steps (a configured fallback would jump the queue at 0.85); the
    # CNN step only gets images MTCNN found nothing in, so it skips the padded retry
    mtcnn = FacePipeline(pipeline.backend, pipeline.shape_predictor, pipeline.detector, pipeline.pad_retry)
    cnn = FacePipeline(pipeline.backend, pipeline.shape_predictor, pipeline.detector, 0.0,
                       fallback=MmodDetector(pipeline.backend, upsample=1))
    out, how = {}, {}
    for name in names:
        img = decode_image((facedata / name).read_bytes())
        # like dlib's baseline cascade: the confident detector first, then lower thresholds, then the
        # whole image (a low threshold first would pick a large false detection over the real face)
        for threshold in (0.85, 0.5, 0.0):
            faces = mtcnn.faces(img, det_prob_threshold=threshold, limit=1)
            if faces:
                out[name], how[name] = faces[0].embedding, f"detected@{threshold}"
                break
        else:
            faces = cnn.faces(img, det_prob_threshold=0.0, limit=1)
            if faces:
                out[name], how[name] = faces[0].embedding, "mmod"
            else:
                h, w = img.shape[:2]
                out[name], how[name] = pipeline.embed_chips(pipeline.align(img, [(0, 0, w - 1, h - 1)]))[0], "whole"
    return out, how


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random genuine pair scores above a random impostor pair (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    # average ranks for ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def best_threshold(dist: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Threshold on distance (same if d <= t) maximising accuracy."""
    cand = np.unique(dist)
    best = (0.0, 0.0)
    for t in cand:
        acc = float(((dist <= t) == (same == 1)).mean())
        if acc > best[0]:
            best = (acc, float(t))
    return best


def eer_threshold(dist: np.ndarray, same: np.ndarray) -> float:
    """Distance where false accept rate equals false reject rate."""
    cand = np.unique(dist)
    gen, imp = dist[same == 1], dist[same == 0]
    diffs = [abs((imp <= t).mean() - (gen > t).mean()) for t in cand]
    return float(cand[int(np.argmin(diffs))])


def calibrate(dist_norm: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """c0 = the EER distance (similarity 0.5 there); c1 from a logistic fit of same ~ tanh((c0-d)c1)."""
    c0 = eer_threshold(dist_norm, same)
    # similarity s = (tanh((c0-d)c1)+1)/2 = sigmoid(2 c1 (c0-d)): fit the slope by 1-D maximum likelihood
    x = c0 - dist_norm
    best_ll, c1 = -math.inf, 1.0
    for cand in np.linspace(0.5, 80, 1060):
        p = np.clip(1 / (1 + np.exp(-2 * cand * x)), 1e-9, 1 - 1e-9)
        ll = float(np.sum(same * np.log(p) + (1 - same) * np.log(1 - p)))
        if ll > best_ll:
            best_ll, c1 = ll, float(cand)
    return c0, c1


def bench_verification(pipeline, facedata: Path, settings: Settings) -> dict:
    rows = list(csv.DictReader(open(facedata / "pairs_detail.csv")))
    names = sorted({r["image_a"] for r in rows} | {r["image_b"] for r in rows})
    t = time.perf_counter()
    emb, how = describe_images(pipeline, facedata, names)
    elapsed = time.perf_counter() - t
    a = np.stack([emb[r["image_a"]] for r in rows])
    b = np.stack([emb[r["image_b"]] for r in rows])
    same = np.array([int(r["same"]) for r in rows])
    raw = np.linalg.norm(a - b, axis=1)
    na = a / np.linalg.norm(a, axis=1, keepdims=True)
    nb = b / np.linalg.norm(b, axis=1, keepdims=True)
    norm = np.linalg.norm(na - nb, axis=1)
    c0, c1 = calibrate(norm, same)
    s0, s1 = settings.similarity_coefficients()
    sim_default = (np.tanh((s0 - norm) * s1) + 1) / 2
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups["ALL"].append(i)
        if r["source_a"] != "orl-att-faces" or r["source_b"] != "orl-att-faces":
            groups["ALL excl. ORL"].append(i)
        groups[r["source_a"] if r["source_a"] == r["source_b"] else "cross-source"].append(i)
    table = []
    for g, idx in sorted(groups.items(), key=lambda kv: (kv[0] != "ALL", kv[0] != "ALL excl. ORL", kv[0])):
        idx = np.array(idx)
        s, d, dn = same[idx], raw[idx], norm[idx]
        acc, thr = best_threshold(d, s)
        table.append({
            "group": g, "genuine": int(s.sum()), "impostor": int((1 - s).sum()),
            "acc_raw_0.6": float(((d <= 0.6) == (s == 1)).mean()),
            "acc_similarity_0.5": float(((sim_default[idx] >= 0.5) == (s == 1)).mean()),
            "acc_calibrated_0.5": float(((dn <= c0) == (s == 1)).mean()),
            "best_acc": acc, "best_thr_raw": thr, "auc": roc_auc(-d, s),
        })
    return {"pairs": len(rows), "images": len(names), "seconds": elapsed,
            "face_source": {k: sum(v == k for v in how.values()) for k in sorted(set(how.values()))},
            "whole_image_fallback": sorted(k for k, v in how.items() if v == "whole"),
            "calibrated_c0_c1": [c0, c1], "settings_c0_c1": [s0, s1],
            "groups": table}


# ---------------------------------------------------------------- detection


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (n,4) and (m,4) x_min,y_min,x_max,y_max boxes."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def greedy_match(gt: np.ndarray, det: np.ndarray, thr: float) -> list[int]:
    """Indices of the detections matched to a ground-truth box: pairs taken by descending IoU, each
    box and detection once, while the IoU is >= thr."""
    if len(gt) == 0 or len(det) == 0:
        return []
    m = iou(gt, det)
    matched = []
    while True:
        i, j = np.unravel_index(np.argmax(m), m.shape)
        if m[i, j] < thr:
            return matched
        matched.append(int(j))
        m[i, :] = -1
        m[:, j] = -1


def bench_detection(pipeline, facedata: Path, threshold: float) -> dict:
    from server.vision.decode import decode_image

    gt = json.loads((facedata / "detection_gt.json").read_text())
    tp = {0.4: 0, 0.3: 0}
    n_gt = n_det = 0
    zero_imgs = zero_fp = 0
    count_err, count_exact, count_n = [], 0, 0
    for name, info in sorted(gt.items()):
        img = decode_image((facedata / name).read_bytes())
        faces = pipeline.faces(img, det_prob_threshold=threshold, embed=False)
        det = np.array([f.box for f in faces], float).reshape(-1, 4)
        if info.get("face_count") == 0:
            zero_imgs += 1
            zero_fp += int(len(faces) > 0)
        if info.get("boxes"):
            g = np.array(info["boxes"], float).reshape(-1, 4)
            n_gt += len(g)
            n_det += len(det)
            for thr in tp:
                tp[thr] += len(greedy_match(g, det, thr))
        elif info.get("face_count") is not None and info.get("face_count") > 0:
            count_n += 1
            count_err.append(abs(len(faces) - info["face_count"]))
            count_exact += int(len(faces) == info["face_count"])
    return {
        "threshold": threshold, "gt_boxes": n_gt, "detections": n_det,
        "recall@0.4": tp[0.4] / max(n_gt, 1), "precision@0.4": tp[0.4] / max(n_det, 1),
        "recall@0.3": tp[0.3] / max(n_gt, 1), "precision@0.3": tp[0.3] / max(n_det, 1),
        "zero_face_images": zero_imgs, "zero_face_images_with_detection": zero_fp,
        "count_only_images": count_n, "count_mae": float(np.mean(count_err)) if count_err else None,
        "count_exact": count_exact / max(count_n, 1),
    }


# ---------------------------------------------------------------- YuNet calibration


def isotonic(y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Pool-adjacent-violators: the non-decreasing sequence closest to y (weighted least squares)."""
    y = np.asarray(y, np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, np.float64)
    vals, weights, counts = [], [], []
    for yi, wi in zip(y, w):
        vals.append(yi), weights.append(wi), counts.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v, wt, c = vals.pop(), weights.pop(), counts.pop()
            vals[-1] = (vals[-1] * weights[-1] + v * wt) / (weights[-1] + wt)
            weights[-1] += wt
            counts[-1] += c
    return np.repeat(vals, counts)


def labelled_detections(detector, facedata: Path, iou_thr: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores of every detection on the dev ground truth, and whether each is a face (1/0).

    Images with boxes: greedy matching at IoU >= iou_thr. Images without faces: every detection is
    false. Images known to hold n faces but without boxes: the n highest-scoring detections count as
    faces, the rest as false (the true faces nearly always score highest)."""
    from server.vision.decode import decode_image

    gt = json.loads((facedata / "detection_gt.json").read_text())
    scores, labels = [], []
    for name, info in sorted(gt.items()):
        count = info.get("face_count")
        if count is None:
            continue
        boxes, raw = detector.raw_scores(decode_image((facedata / name).read_bytes()))
        if len(raw) == 0:
            continue
        lab = np.zeros(len(raw), np.int64)
        if info.get("boxes"):
            lab[greedy_match(np.array(info["boxes"], float).reshape(-1, 4), boxes.astype(float), iou_thr)] = 1
        elif count > 0:
            lab[np.argsort(-raw, kind="stable")[:count]] = 1
        scores.append(raw), labels.append(lab)
    return np.concatenate(scores), np.concatenate(labels)


def calibrate_yunet(detector, facedata: Path, knots=None) -> dict:
    """Isotonic fit of P(face | raw score) on the dev ground truth, read at fixed score knots."""
    from server.vision.yunet import CALIBRATION_SCORES

    scores, labels = labelled_detections(detector, facedata)
    order = np.argsort(scores, kind="stable")
    fit = isotonic(labels[order].astype(float))
    knots = np.asarray(knots if knots is not None else CALIBRATION_SCORES, float)
    sorted_scores = scores[order]
    probs = []
    for k in knots:  # the fitted precision of the detections nearest each knot
        near = np.argsort(np.abs(sorted_scores - k))[:25]
        probs.append(float(np.clip(np.median(fit[near]), 0.0, 1.0)))
    probs = np.maximum.accumulate(probs)
    rows = []
    for lo, hi in zip(knots[:-1], knots[1:]):
        sel = (scores >= lo) & (scores < hi if hi < 1 else scores <= hi)
        rows.append({"score_from": float(lo), "score_to": float(hi), "detections": int(sel.sum()),
                     "faces": int(labels[sel].sum()),
                     "precision": float(labels[sel].mean()) if sel.any() else float("nan")})
    return {"detections": int(len(scores)), "faces": int(labels.sum()), "knots": knots.tolist(),
            "probabilities": [round(float(p), 4) for p in probs], "bins": rows}


def fit_yunet_rect(pipeline, reference: dict, facedata: Path) -> dict:
    """Refit yunet.landmarks_to_rect's constants on dlib's reference faces and measure the result.

    Each reference face (dlib's HOG rect) is matched to the YuNet detection with the largest IoU
    (>= 0.3); the constants are the medians of the rect's centre offset from the eye centre and of
    its side, in units of the eye-centre-to-mouth-centre distance. Then the descriptor of each face
    aligned from the fitted rect is compared with dlib's own (reference["descriptor"])."""
    from server.vision.decode import decode_image
    from server.vision.yunet import landmarks_to_rect

    rows, images = [], {}
    for i, source in enumerate(reference["source"]):
        source = str(source)
        if source not in images:
            if source.startswith("skimage"):
                from skimage.data import astronaut

                images[source] = astronaut()
            else:
                images[source] = decode_image((facedata / source).read_bytes())
        img = images[source]
        det = pipeline.detector.detect(img)
        if len(det) == 0:
            continue
        rect = reference["rect"][i].astype(np.float64)
        overlap = iou(rect[None], det.boxes.astype(np.float64))[0]
        j = int(np.argmax(overlap))
        if overlap[j] >= 0.3:
            rows.append((i, img, det.landmarks[j].astype(np.float64), rect))
    marks = np.stack([r[2] for r in rows])
    rects = np.stack([r[3] for r in rows])
    eyes = (marks[:, 0] + marks[:, 1]) / 2
    unit = np.linalg.norm((marks[:, 3] + marks[:, 4]) / 2 - eyes, axis=1)
    dx = float(np.median(((rects[:, 0] + rects[:, 2]) / 2 - eyes[:, 0]) / unit))
    dy = float(np.median(((rects[:, 1] + rects[:, 3]) / 2 - eyes[:, 1]) / unit))
    side = float(np.median((rects[:, 2] - rects[:, 0]) / unit))
    def distances(**constants) -> dict:
        d = np.array([np.linalg.norm(pipeline.embed_chips(pipeline.align(img, [landmarks_to_rect(m, **constants)]))[0]
                                     - reference["descriptor"][i]) for i, img, m, _ in rows])
        return {"mean": float(d.mean()), "p95": float(np.percentile(d, 95)), "max": float(d.max())}

    return {"faces": int(len(reference["source"])), "matched": len(rows), "dx": dx, "dy": dy, "side": side,
            "descriptor_distance": distances(dx=dx, dy=dy, side=side),  # with the refitted constants
            "descriptor_distance_in_use": distances()}  # with yunet.RECT_DX / RECT_DY / RECT_SIDE


# ---------------------------------------------------------------- report


def run_pipeline_bench(args: argparse.Namespace) -> dict:
    settings = Settings.from_env(model_dir=args.model_dir, backend=args.backend, torch_device=args.device,
                                 inference_threads=args.threads, batching=False, detector=args.detector)
    inference = build_inference(settings, batching=False, plugins=False)
    backend, pipeline = inference.backend, inference.pipeline
    facedata = Path(args.facedata)
    have_data = facedata.is_dir()
    device = str(getattr(backend, "device", "cpu"))  # torch's; onnxruntime here runs on the CPU
    report: dict = {"threads": args.threads, "backend": settings.backend, "device": device}
    print(f"# pipeline benchmark (backend {settings.backend}, device {device}, {args.threads} CPU inference threads)\n")
    report["embedder"] = bench_embedder(pipeline, tuple(int(b) for b in args.batches.split(",")))
    print("## embedder\n" + markdown_table(report["embedder"], {"ms_per_batch": ".1f", "faces_per_s": ".0f"}) + "\n")
    report["detector"] = bench_detector(pipeline, detector_images(facedata if have_data else None))
    print("## detector (median ms)\n"
          + markdown_table(report["detector"], {"detect_ms": ".1f", "faces_call_ms": ".1f"}) + "\n")
    if not have_data:
        print(f"(no dev photos at {facedata}: verification and detection accuracy skipped)")
        return report
    if not args.skip_accuracy:
        v = bench_verification(pipeline, facedata, settings)
        report["verification"] = v
        print(f"## verification on pairs.csv ({v['pairs']} pairs, {v['images']} images, {v['seconds']:.1f} s; "
              f"whole-image fallback for {len(v['whole_image_fallback'])} images)\n")
        print(f"face source per image: {v['face_source']}\n")
        print(markdown_table(v["groups"], {"acc_raw_0.6": ".4f", "acc_similarity_0.5": ".4f",
                                           "acc_calibrated_0.5": ".4f", "best_acc": ".4f",
                                           "best_thr_raw": ".3f", "auc": ".5f"}))
        print(f"\ncalibrated similarity coefficients on dev pairs: c0={v['calibrated_c0_c1'][0]:.6f} "
              f"c1={v['calibrated_c0_c1'][1]:.6f} (settings use {v['settings_c0_c1']})\n")
        d = bench_detection(pipeline, facedata, settings.face_threshold())
        report["detection"] = d
        print("## detection on detection_gt.json\n" + markdown_table([d]) + "\n")
    return report


def run_calibration(args: argparse.Namespace) -> dict:
    from server.vision.yunet import YunetDetector

    settings = Settings.from_env(model_dir=args.model_dir, batching=False)
    detector = YunetDetector(open_backend(settings, batching=False), max_side=settings.max_detect_side,
                             max_upscale=settings.detect_max_upscale)
    report = calibrate_yunet(detector, Path(args.facedata))
    print(f"# YuNet score calibration on {args.facedata}/detection_gt.json: {report['detections']} detections, "
          f"{report['faces']} of them faces\n")
    print(markdown_table(report["bins"], {"precision": ".3f"}) + "\n")
    print("CALIBRATION_SCORES = " + repr(tuple(report["knots"])))
    print("CALIBRATION_PROBS = " + repr(tuple(report["probabilities"])))
    return report


def run_rect_fit(args: argparse.Namespace) -> dict:
    settings = Settings.from_env(model_dir=args.model_dir, batching=False, detector="yunet")
    pipeline = build_inference(settings, batching=False, plugins=False).pipeline
    reference = dict(np.load(Path(args.reference), allow_pickle=False))
    report = fit_yunet_rect(pipeline, reference, Path(args.facedata))
    print(f"# YuNet points -> dlib rect, fitted on {report['matched']} of {report['faces']} reference faces\n")
    print(f"RECT_DX, RECT_DY, RECT_SIDE = {report['dx']:.4f}, {report['dy']:.4f}, {report['side']:.4f}")
    for label, key in (("these constants", "descriptor_distance"), ("the constants in use", "descriptor_distance_in_use")):
        d = report[key]
        print(f"descriptor distance to dlib's with {label}: mean {d['mean']:.4f}, p95 {d['p95']:.4f}, max {d['max']:.4f}")
    return report


def onet_veto_table(pipeline, facedata: Path, threshold: float, grow: float,
                    vetoes=(0.0, 0.002, 0.005, 0.01, 0.02, 0.05)) -> dict:
    """What the O-Net veto (YunetDetector onet_veto) keeps at each veto level, from one pass of YuNet
    without it: the labelled faces of detection_gt.json (greedy match at IoU 0.4), the false boxes there,
    the zero-face photos given a box, and every detection (count-only photos included)."""
    from server.vision.decode import decode_image
    from server.vision.mtcnn import MtcnnDetector

    second = MtcnnDetector(pipeline.detector.backend, max_side=pipeline.detector.max_side)
    gt = json.loads((facedata / "detection_gt.json").read_text())
    labels, opinions, zero_images, seconds = [], [], [], []
    n_gt = 0
    for name, info in sorted(gt.items()):
        count = info.get("face_count")
        if count is None:
            continue
        img = decode_image((facedata / name).read_bytes())
        boxes = np.array([f.box for f in pipeline.faces(img, det_prob_threshold=threshold, embed=False)],
                         np.float32).reshape(-1, 4)
        if info.get("boxes"):
            n_gt += len(info["boxes"])
        if len(boxes) == 0:
            continue
        t0 = time.perf_counter()
        prob = second.face_probability([img], [boxes], grow=grow)[0]
        seconds.append(time.perf_counter() - t0)
        lab = np.full(len(boxes), -1)  # -1: count-only photo, no boxes to match
        if info.get("boxes"):
            lab[:] = 0
            lab[greedy_match(np.array(info["boxes"], float).reshape(-1, 4), boxes.astype(float), 0.4)] = 1
        elif count == 0:
            lab[:] = 0
            zero_images.append((name, prob))
        labels.append(lab), opinions.append(prob)
    lab, prob = np.concatenate(labels), np.concatenate(opinions)
    rows = []
    for veto in vetoes:
        keep = prob >= veto
        rows.append({"onet_veto": veto, "faces_kept": f"{int((keep & (lab == 1)).sum())}/{int((lab == 1).sum())}",
                     "recall@0.4": float((keep & (lab == 1)).sum() / max(n_gt, 1)),
                     "false_kept": f"{int((keep & (lab == 0)).sum())}/{int((lab == 0).sum())}",
                     "zero_face_images_with_box": sum(bool((p >= veto).any()) for _, p in zero_images),
                     "detections_dropped": f"{int((~keep).sum())}/{len(prob)}"})
    faces = np.sort(prob[lab == 1])
    return {"threshold": threshold, "grow": grow, "rows": rows,
            "lowest_face_opinions": [round(float(x), 4) for x in faces[:5]],
            "zero_face_opinions": {n: [round(float(x), 4) for x in p] for n, p in zero_images},
            "onet_ms_per_image_median": 1000 * float(np.median(seconds)) if seconds else None}


def run_onet_veto(args: argparse.Namespace) -> dict:
    settings = Settings.from_env(model_dir=args.model_dir, batching=False, detector="yunet", yunet_onet_veto=0.0)
    pipeline = build_inference(settings, batching=False, plugins=False).pipeline
    report = onet_veto_table(pipeline, Path(args.facedata), settings.face_threshold(), args.grow)
    print(f"# O-Net's second opinion on YuNet's boxes at det_prob_threshold {report['threshold']} "
          f"(box grown {args.grow:g}), {args.facedata}/detection_gt.json\n")
    print(markdown_table(report["rows"], {"recall@0.4": ".4f"}) + "\n")
    print(f"lowest O-Net probabilities of labelled faces: {report['lowest_face_opinions']}")
    print(f"zero-face photos' boxes: {report['zero_face_opinions']}")
    print(f"O-Net second opinion: {report['onet_ms_per_image_median']:.2f} ms per image with a face (median)")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["age-gender"]:  # gender accuracy and ages on the dev photos (benchmarks/age_gender.py)
        from benchmarks.age_gender import main as age_gender_main

        return age_gender_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("age-gender", help="gender accuracy and predicted ages on the dev photos "
                   "(python -m benchmarks.pipeline age-gender --help)")
    p = sub.add_parser("pipeline", help="embedder/detector speed, verification and detection accuracy")
    p.add_argument("--facedata", default=str(DEFAULT_FACEDATA))
    p.add_argument("--model-dir", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--device", default="auto", help="torch backend: auto | cpu | cuda | cuda:N")
    p.add_argument("--batches", default="1,8,32,64", help="embedder batch sizes (e.g. 64,128,256,512 on a GPU)")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--detector", default=None, choices=["yunet", "mtcnn"], help="default: FR_DETECTOR or yunet")
    p.add_argument("--out", help="also write the report as JSON")
    c = sub.add_parser("yunet-calibration",
                       help="YuNet raw score -> measured precision on the dev ground truth (CALIBRATION_PROBS)")
    c.add_argument("--facedata", default=str(DEFAULT_FACEDATA))
    c.add_argument("--model-dir", default=None)
    c.add_argument("--out", help="also write the report as JSON")
    f = sub.add_parser("yunet-rect-fit", help="YuNet's points -> dlib's rect: refit RECT_DX/DY/SIDE on dlib's "
                       "reference faces, and the descriptors' distance to dlib's")
    f.add_argument("--facedata", default=str(DEFAULT_FACEDATA))
    f.add_argument("--reference", default=str(DEFAULT_FACEDATA.parents[1] / "reference" / "dlib_reference_faces.npz"))
    f.add_argument("--model-dir", default=None)
    f.add_argument("--out", help="also write the report as JSON")
    v = sub.add_parser("yunet-onet-veto", help="what YuNet's O-Net veto (FR_YUNET_ONET_VETO) keeps and drops on the "
                       "dev ground truth, per veto level")
    v.add_argument("--facedata", default=str(DEFAULT_FACEDATA))
    v.add_argument("--model-dir", default=None)
    v.add_argument("--grow", type=float, default=0.2, help="boxes grown by this x their size before O-Net sees them")
    v.add_argument("--out", help="also write the report as JSON")
    args = parser.parse_args(argv)
    runs = {"yunet-calibration": run_calibration, "yunet-rect-fit": run_rect_fit, "yunet-onet-veto": run_onet_veto}
    report = runs.get(args.what, run_pipeline_bench)(args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
