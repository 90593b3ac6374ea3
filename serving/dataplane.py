"""The protocol-free data plane: what every front end (grpcio, native, REST) serves from.

`DataPlane` is built once per server and handed to every adapter: the core (validation, the batchers,
the operations), the Open Inference Protocol's model view (`OipModels`: names, versions, metadata,
input checks, output selection), the one bytes-in-flight budget and the metrics. Adapters only turn
their encoding into these calls and the results back into their encoding; none of them holds a second
copy of any of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving import __version__
from serving.budget import InflightBudget, Lease
from serving.core import VaeCore, Work
from serving.detector import OIP_DEFAULT_OUTPUTS, OIP_MODEL, OIP_OUTPUTS, Detector, ScoreResult, oip_args
from serving.errors import InvalidInput
from serving.manifest import GraphSpec, TensorSpec
from serving.metrics import Metrics

SERVER_NAME = "vae-serve"
PLATFORM = "onnxruntime_onnx"
MODEL_VERSION = "1"
# Manifest dtype -> Open Inference Protocol datatype (the export writes float32 only).
DATATYPES = {"float32": "FP32"}
FP32 = DATATYPES["float32"]


class OipModels:
    """The Open Inference Protocol's models, protocol-free: what gRPC (`OipServicer`) and REST
    (`serving.http`) share. Names, versions, metadata, and every check of an infer request that does not
    depend on how its tensors are encoded; the adapters only unpack their encoding."""

    def __init__(self, core: VaeCore, detector: Detector) -> None:
        self.core = core
        self.detector = detector
        self.models: dict[str, GraphSpec] = dict(core.graphs)
        # `score` (serving.detector): x -> the anomaly scores; k, seed, quantile and kind as parameters.
        x = core.graphs["encoder"].input
        self.models[OIP_MODEL] = GraphSpec(inputs=(x,), outputs=tuple(
            TensorSpec(n, "float32", (1,) if n == "threshold" else x.shape if n == "feature_scores" else (-1,))
            for n in OIP_OUTPUTS))
        self._declared = {name: g.output_names() for name, g in self.models.items()}  # callers do not mutate
        self.versions = ("", MODEL_VERSION, core.manifest.version)
        self.metadata: dict[str, dict[str, Any]] = {
            name: {"name": name, "versions": [MODEL_VERSION], "platform": PLATFORM,
                   "inputs": [{"name": t.name, "datatype": DATATYPES[t.dtype], "shape": list(t.shape)}
                              for t in g.inputs],
                   "outputs": [{"name": t.name, "datatype": DATATYPES[t.dtype], "shape": list(t.shape)}
                               for t in g.outputs]}
            for name, g in self.models.items()}
        self.server_metadata: dict[str, Any] = {"name": SERVER_NAME, "version": __version__, "extensions": []}

    def model(self, name: str, version: str) -> GraphSpec:
        spec = self.models.get(name)
        if spec is None:
            raise InvalidInput("model_name", f"one of {sorted(self.models)}", repr(name))
        if version not in self.versions:
            raise InvalidInput("model_version", f"'', {MODEL_VERSION!r} or {self.core.manifest.version!r}",
                               repr(version), name)
        return spec

    def model_ready(self, name: str, version: str) -> bool:
        return name in self.models and version in self.versions and self.core.ready

    def check_input(self, model: str, spec: GraphSpec, names: list[str], datatype: str) -> TensorSpec:
        """The request names one input, the model's, with its datatype; that input's spec."""
        want = spec.input
        if len(names) != 1 or names[0] != want.name:
            raise InvalidInput("inputs", f"one input named {want.name!r}", str(names), model)
        if datatype != DATATYPES[want.dtype]:
            raise InvalidInput(f"inputs[{want.name!r}].datatype", DATATYPES[want.dtype], repr(datatype), model)
        return want

    def outputs(self, model: str, spec: GraphSpec, requested: list[str]) -> list[str]:
        """The outputs to return: those requested (each one the model has), else all of them."""
        declared = self._declared[model]
        if not requested:
            return list(OIP_DEFAULT_OUTPUTS) if model == OIP_MODEL else declared
        wanted = requested
        unknown = [n for n in wanted if n not in declared]
        if unknown:
            raise InvalidInput("outputs", f"names among {declared}", str(unknown), model)
        return wanted

    def infer_work(self, model: str, spec: GraphSpec, field: str, shape: Any, data: bytes | memoryview,
                   requested: list[str], lease: Lease | None = None) -> tuple[Work, list[str]]:
        """A checked infer request (its model found and its input named by `check_input`) -> the batcher
        run that answers it, whose outputs are a dict by name, and the output names to return, in order."""
        arr = self.core.input_tensor(model, field, shape, data)
        wanted = self.outputs(model, spec, requested)
        return self.core.run_work(model, arr, requested or None, lease), wanted


    async def score(self, field: str, shape: Any, data: bytes | memoryview, requested: list[str],
                    params: dict[str, Any], deadline: float | None
                    ) -> tuple[list[tuple[str, np.ndarray]], ScoreResult]:
        """The `score` model's infer request (checked by `check_input`): its parameters as plain values
        (`serving.detector.oip_args`) -> the output tensors to return, in order, and the result."""
        wanted = self.outputs(OIP_MODEL, self.models[OIP_MODEL], requested)
        x = self.core.input_tensor("encoder", field, shape, data)
        result = await self.detector.score(x, oip_args(params, "feature_scores" in wanted), deadline)
        return self.detector.oip_outputs(result, wanted), result

    @staticmethod
    def score_parameters(result: ScoreResult) -> dict[str, Any]:
        """The `score` model's response parameters: what the request did not fix and the calibration."""
        return {"k": result.k, "seed": result.seed, "kind": result.kind, "quantile": result.quantile,
                "calibration": result.calibration}


class DataPlane:
    """One server's data plane: core, OIP models, budget and metrics, shared by every front end."""

    def __init__(self, core: VaeCore, metrics: Metrics, budget: InflightBudget) -> None:
        self.core = core
        self.metrics = metrics
        self.budget = budget
        self.detector = Detector(core, metrics)
        self.oip = OipModels(core, self.detector)
        self.config = core.config
