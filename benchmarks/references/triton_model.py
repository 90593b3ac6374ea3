"""Triton python-backend model (copied as <repo>/<model>/1/model.py by `benchmarks.references.triton`):
one ONNX Runtime session (CPU, `intra_op_threads` from config.pbtxt) run on each batch that Triton's
dynamic batcher hands to `execute`; each request gets its rows of every output back."""

import json
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(params["onnx_path"], so, providers=["CPUExecutionProvider"])
        self.input = cfg["input"][0]["name"]
        self.outputs = [o["name"] for o in cfg["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        xs = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        outs = self.sess.run(self.outputs, {self.input: np.ascontiguousarray(x, dtype=np.float32)})
        responses, start = [], 0
        for a in xs:
            n = a.shape[0]
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, o[start:start + n]) for name, o in zip(self.outputs, outs)]))
            start += n
        return responses

    def finalize(self) -> None:
        self.sess = None  # type: ignore[assignment]
