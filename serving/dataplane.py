"""The protocol-free data plane: what every front end (grpcio, native, REST) serves from.

`DataPlane` is built once per server and handed to every adapter: the model repository (each model
version's core: validation, the batchers, the operations; `serving.repository`), the Open Inference Protocol's model view (`OipModels`: names, versions, metadata,
input checks, output selection), the one bytes-in-flight budget and the metrics. Adapters only turn
their encoding into these calls and the results back into their encoding; none of them holds a second
copy of any of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from serving import __version__
from serving.budget import InflightBudget, Lease
from serving.core import Work
from serving.detector import OIP_DEFAULT_OUTPUTS, OIP_MODEL, OIP_OUTPUTS, ScoreResult, oip_args
from serving.errors import ExtensionOff, InvalidInput, ModelNotFound, quote
from serving.layout import NAME_RE, LayoutError, check_name
from serving.manifest import GraphSpec, TensorSpec
from serving.metrics import Metrics
from serving.repository import ModelVersion, Repository

SERVER_NAME = "vae-serve"
PLATFORM = "onnxruntime_onnx"
MODEL_VERSION = "1"  # a --model-dir server's one version (serving.repository.LEGACY_VERSION)
# Manifest dtype -> Open Inference Protocol datatype (the export writes float32 only).
DATATYPES = {"float32": "FP32"}
FP32 = DATATYPES["float32"]


class OipModels:
    """The Open Inference Protocol's models, protocol-free: what gRPC (`OipServicer`) and REST
    (`serving.http`) share. Names, versions, metadata, and every check of an infer request that does not
    depend on how its tensors are encoded; the adapters only unpack their encoding. Names and versions
    resolve through the repository (`serving.layout`: `<vae>.<graph>`, or the graph alone with one model),
    for every VAE's graphs: `encoder`, `decoder` and `score` (`serving.detector`)."""

    def __init__(self, repo: Repository, explicit: bool = False) -> None:
        self.repo = repo
        self.explicit = explicit
        self.server_metadata: dict[str, Any] = {"name": SERVER_NAME, "version": __version__,
                                                "extensions": ["model_repository"] if explicit else []}

    def model(self, name: str, version: str, lease: Lease | None = None) -> tuple[ModelVersion, str, GraphSpec]:
        """(the model version, the graph, its spec) that `name` and `version` answer to, pinned on the request."""
        v, graph = self.repo.resolve_oip(name, version, lease)
        return v, graph, v.graphs[graph]

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        """ModelMetadata of `name` (as asked for) at `version`: the graph's tensors, the versions routed."""
        v, _, spec = self.model(name, version)
        versions = [str(n) for n in self.repo.models.get(v.name, {})]
        key = f"oip-metadata:{name}:{','.join(versions)}"
        meta: dict[str, Any] | None = v.memo.get(key)
        if meta is None:
            meta = v.memo[key] = {
                "name": name, "versions": versions, "platform": PLATFORM,
                "inputs": [{"name": t.name, "datatype": DATATYPES[t.dtype], "shape": list(t.shape)}
                           for t in spec.inputs],
                "outputs": [{"name": t.name, "datatype": DATATYPES[t.dtype], "shape": list(t.shape)}
                            for t in spec.outputs]}
        return meta

    def model_ready(self, name: str, version: str) -> bool:
        try:
            self.repo.resolve_oip(name, version, pin=False)
        except (ModelNotFound, InvalidInput):
            return False
        return self.repo.ready

    @staticmethod
    def check_input(model: str, spec: GraphSpec, names: list[str], datatype: str) -> TensorSpec:
        """The request names one input, the model's, with its datatype; that input's spec."""
        want = spec.input
        if len(names) != 1 or names[0] != want.name:
            raise InvalidInput("inputs", f"one input named {want.name!r}", str(names), model)
        if datatype != DATATYPES[want.dtype]:
            raise InvalidInput(f"inputs[{want.name!r}].datatype", DATATYPES[want.dtype], repr(datatype), model)
        return want

    @staticmethod
    def outputs(v: ModelVersion, graph: str, model: str, requested: list[str]) -> list[str]:
        """The outputs to return: those requested (each one the model has), else all of them."""
        declared: list[str] = list(OIP_OUTPUTS) if graph == OIP_MODEL else list(v.core.output_index[graph])
        if not requested:
            return list(OIP_DEFAULT_OUTPUTS) if graph == OIP_MODEL else declared
        unknown = [n for n in requested if n not in declared]
        if unknown:
            raise InvalidInput("outputs", f"names among {declared}", str(unknown), model)
        return requested

    def infer_work(self, v: ModelVersion, graph: str, model: str, field: str, shape: Any, data: bytes | memoryview,
                   requested: list[str], lease: Lease | None = None) -> tuple[Work, list[str]]:
        """A checked infer request (its model found and its input named by `check_input`) -> the batcher
        run that answers it, whose outputs are a dict by name, and the output names to return, in order."""
        arr = v.core.input_tensor(graph, field, shape, data)
        wanted = self.outputs(v, graph, model, requested)
        return v.core.run_work(graph, arr, requested or None, lease), wanted

    async def score(self, v: ModelVersion, model: str, field: str, shape: Any, data: bytes | memoryview,
                    requested: list[str], params: dict[str, Any], deadline: float | None
                    ) -> tuple[list[tuple[str, np.ndarray]], ScoreResult]:
        """A `score` graph's infer request (its version resolved and pinned by `model`, its input checked by
        `check_input`): its parameters as plain values (`serving.detector.oip_args`) -> the output tensors to
        return, in order, and the result; scored by that version's detector (its batchers, its calibration)."""
        wanted = self.outputs(v, OIP_MODEL, model, requested)
        x = v.core.input_tensor("encoder", field, shape, data)
        result = await v.detector.score(x, oip_args(params, "feature_scores" in wanted), deadline)
        return v.detector.oip_outputs(result, wanted), result

    @staticmethod
    def score_parameters(result: ScoreResult) -> dict[str, Any]:
        """The `score` model's response parameters: what the request did not fix and the calibration."""
        return {"k": result.k, "seed": result.seed, "kind": result.kind, "quantile": result.quantile,
                "calibration": result.calibration}


    # -- the repository extension (index, load, unload), on only with --model-control explicit ---------

    def _repository_call(self, what: str, repository_name: str, parameters: Iterable[str] = (),
                         allowed: tuple[str, ...] = ()) -> None:
        if not self.explicit:
            raise ExtensionOff(f"{what}: the model repository extension is off; the server runs with "
                               f"--model-control {self.repo.config.model_control} (explicit turns it on)")
        if repository_name:
            raise InvalidInput("repository_name", "'' (the server has one repository)", repr(repository_name))
        unknown = sorted(p for p in parameters if p not in allowed)
        if unknown:
            raise InvalidInput("parameters", f"only {list(allowed)} (no config or file overrides: a version is "
                               "what its directory holds)" if allowed else "none (no config or file overrides: "
                               "a version is what its directory holds)", quote(str(unknown)))

    def repository_index(self, repository_name: str, ready: bool) -> list[dict[str, str]]:
        """Triton's RepositoryIndex: {name, version, state, reason} per model version."""
        self._repository_call("RepositoryIndex", repository_name)
        return self.repo.index(ready_only=ready)

    async def load(self, repository_name: str, model_name: str, parameters: Iterable[str] = ()) -> None:
        """Triton's RepositoryModelLoad: (re)load the versions the policy picks (`Repository.load`)."""
        self._repository_call("RepositoryModelLoad", repository_name, parameters)
        await self.repo.load(check_model_name(model_name))

    async def unload(self, repository_name: str, model_name: str, parameters: Iterable[str] = ()) -> None:
        """Triton's RepositoryModelUnload (tritonclient sends `unload_dependents`: there are none here)."""
        self._repository_call("RepositoryModelUnload", repository_name, parameters, ("unload_dependents",))
        await self.repo.unload(check_model_name(model_name))


def check_model_name(name: str) -> str:
    """A repository model name as the layout allows it (InvalidInput naming the field otherwise)."""
    try:
        return check_name(name)
    except LayoutError as e:
        raise InvalidInput("model_name", f"a name matching {NAME_RE.pattern}", quote(repr(name))) from e


class DataPlane:
    """One server's data plane: the model repository, OIP models, budget and metrics, shared by every
    front end."""

    def __init__(self, repo: Repository, metrics: Metrics, budget: InflightBudget) -> None:
        self.repo = repo
        self.metrics = metrics
        self.budget = budget
        self.config = repo.config
        self.oip = OipModels(repo, explicit=repo.config.model_control == "explicit")
