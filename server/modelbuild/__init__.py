"""The model build (`python -m server models build`): our own converters from the weights in pip
packages to the ONNX files and Triton configs of the model repository.

    repository.py    build / ensure_built: every model, its config.pbtxt per Triton target, build.json
    sources.py       where the pinned weights are (packages, versions, sha256)
    dlib_format.py   dlib's serialisation; dlib_resnet.py the embedder; dlib_shape.py the shape
                     predictor; dlib_mmod.py the MMOD detector; mtcnn_onnx.py MTCNN; yunet.py YuNet;
                     age_gender.py the age and gender models; triton_python_model.py Triton's python target
"""
