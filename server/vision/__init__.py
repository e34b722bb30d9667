"""Faces in images: from encoded bytes to detected, aligned, embedded faces and plugin results.

    decode.py        bytes -> RGB array (CompreFace's formats, EXIF orientation, pixel budget)
    types.py         Face and Detections, the data the detectors, pipeline and plugins share
    pipeline.py      FacePipeline: detect -> 5-point shape -> aligned chip -> embedding
    yunet.py         YuNet, the default detector (one fixed-shape network, batched across requests)
    mtcnn.py         MTCNN, CompreFace's facenet-build detector (FR_DETECTOR=mtcnn)
    mmod.py          dlib's CNN MMOD detector, the fallback for faces the detector missed
    alignment.py     dlib's 5-point shape predictor and face chips; dlib_linalg.py its linear algebra;
                     _kernels.py the compiled (numba) loops
    plugins/         CompreFace's face plugins: age, gender, mask, pose, landmarks (registry, parsing)
"""
