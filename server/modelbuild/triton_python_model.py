"""Triton Python-backend model: runs the ONNX file next to it with onnxruntime.

`python -m server models build --target python` copies this file to `<model>/1/model.py`. It runs
inside Triton's Python stub (numpy + onnxruntime in the stub's interpreter), never in the server,
so it imports only those two and `triton_python_backend_utils`, which the stub provides.

Config parameters (config.pbtxt `parameters`): `intra_op_threads` (0: onnxruntime's default).
"""
import json
import os

import numpy as np

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(uint8)": np.uint8,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float16)": np.float16,
}


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(params.get("intra_op_threads") or 0)
        opts.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = [(i.name, np.dtype(_ORT_TYPES.get(i.type, np.float32))) for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        feeds = []
        for request in requests:
            feed = {}
            for name, dtype in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                feed[name] = np.asarray(tensor.as_numpy(), dtype=dtype)
            feeds.append(feed)
        # The dynamic batcher merges only requests of equal shapes; grouping keeps any mix correct.
        groups = {}
        for i, feed in enumerate(feeds):
            key = tuple(feed[name].shape[1:] for name, _ in self.inputs)
            groups.setdefault(key, []).append(i)
        responses = [None] * len(requests)
        for members in groups.values():
            try:
                batch = {name: np.concatenate([feeds[i][name] for i in members]) for name, _ in self.inputs}
                outs = self.session.run(self.outputs, batch)
            except Exception as exc:  # onnxruntime raises untyped errors; report per request
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            start = 0
            for i in members:
                n = feeds[i][self.inputs[0][0]].shape[0]
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + n]))
                           for name, out in zip(self.outputs, outs)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += n
        return responses

    def finalize(self):
        self.session = None
