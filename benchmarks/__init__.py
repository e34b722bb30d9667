"""Benchmarks and accuracy reports; not part of the shipped package. Run from the repository root
(so that `server`, `index` and the test harnesses in `tests.support` import):

    python -m benchmarks.pipeline pipeline [--detector yunet|mtcnn] [--backend onnxruntime|torch]
        embedder and detector speed, verification and detection accuracy on the dev photos
        (pipeline.py; also `yunet-calibration` and `yunet-rect-fit`, the YuNet constants' fits)
    python -m benchmarks.age_gender [--facedata DIR]       (or: python -m benchmarks.pipeline age-gender)
        gender accuracy and predicted ages of the age and gender plugins (age_gender.py)
    python -m benchmarks.server [--clients 1,8,32,64] [--backend onnxruntime|triton|torch] [--compare-detectors]
        recognize over HTTP against a real server process, next to the raw in-process pipeline (server.py)
    python -m benchmarks.index --faces 1000000
        the vector index at scale: build rate, recall, latency, memory, cold start (index.py)
    python -m benchmarks.import_compare SOURCE [--limit N]
        `python -m server import` against posting the same images one by one (import_compare.py)

common.py holds what they share (the dev photos' folder, test images, markdown tables); they build
the models as the server does, through server/wiring.py.
"""
