"""A batched face recognition server speaking CompreFace's REST API.

One package per concern; a request flows one way, top to bottom, and each layer imports only the
ones below it (`python tools/modmap.py --stats` lists the imports and checks the order):

    cli/         every `python -m server ...` command (serve, models build, keys, import)
    http/        the CompreFace wire format: routes, parameters, errors, the gate, the web page
    core/        the use cases (face service, importer) and the domain errors they raise
    wiring.py    settings -> backend -> micro-batcher -> pipeline -> plugins, for the app and the tools
    vision/      image decoding, face detectors, alignment, embedding pipeline, plugins
    inference/   the Backend protocol, model names, the micro-batcher, ONNX Runtime / Triton / torch
    modelbuild/  converters from the pip-installed weights to the model repository
    storage/     durable storage (SQLite, PostgreSQL); the HNSW index lives in the `index` package
    config.py    Settings (FR_* environment, CLI flags); metrics.py  the Prometheus series
"""
