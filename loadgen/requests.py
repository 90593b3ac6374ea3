"""What the generator sends: requests serialised once before the run, and the model's shapes and input names.

The input tensors' names come from the served model's manifest (GetModelInfo's `manifest_json`), or, for a
server that reports none (a null server), from the one tensor contract, serving.manifest.graph_specs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from loadgen.spec import HTTP_RPCS, RPCS, VAE, BenchError
from serving._proto.inference import grpc_service_pb2 as oip_pb
from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving.manifest import Manifest, ManifestError, graph_specs
from serving.tensors import F32, to_tensor


@dataclass(frozen=True)
class ModelInfo:
    """What the generator needs to know of the served model."""

    example_shape: tuple[int, ...]
    latent_dim: int
    input_names: dict[str, str]  # model ("encoder", "decoder") -> the name of its one input tensor


def contract_input_names(example_shape: tuple[int, ...], latent_dim: int) -> dict[str, str]:
    """Each model's input name as the tensor contract states it (the likelihood changes outputs only)."""
    graphs = graph_specs(example_shape, latent_dim, "bernoulli", learned_variance=False)
    return {role: g.input.name for role, g in graphs.items()}


def model_info_from(info: pb.GetModelInfoResponse) -> ModelInfo | None:
    """A GetModelInfo answer -> ModelInfo (input names from its manifest), or None when it gives no shapes."""
    if not info.example_shape:
        return None
    shape, d = tuple(int(s) for s in info.example_shape), int(info.latent_dim)
    if not info.manifest_json:
        return ModelInfo(shape, d, contract_input_names(shape, d))
    try:
        manifest = Manifest.from_dict(json.loads(info.manifest_json))
    except (ValueError, ManifestError) as e:
        raise BenchError(f"GetModelInfo: the server's manifest_json does not parse ({e})") from e
    return ModelInfo(manifest.example_shape, manifest.latent_dim,
                     {role: g.input.name for role, g in manifest.graphs.items()})


def model_info(target: str, timeout_s: float = 10.0) -> ModelInfo | None:
    """The served model's shapes and input names from GetModelInfo, or None when the server does not say
    (a null server: shapes come from the flags, names from the contract)."""
    with grpc.insecure_channel(target) as ch:
        try:
            info = ch.unary_unary(VAE + "GetModelInfo",
                                  request_serializer=pb.GetModelInfoRequest.SerializeToString,
                                  response_deserializer=pb.GetModelInfoResponse.FromString)(
                pb.GetModelInfoRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise BenchError(f"target: {target} does not answer: {e.details()}") from e
            return None  # a server without GetModelInfo: shapes come from the flags
    return model_info_from(info)


def build_requests(rpc: str, rows: int, example_shape: tuple[int, ...], latent_dim: int,
                   distinct: int = 16, seed: int = 0, input_names: dict[str, str] | None = None) -> list[bytes]:
    """`distinct` serialised requests of `rows` rows each, with different inputs (sent round-robin).
    `input_names` (model -> input tensor name, for the OIP RPCs): the model's, else the contract's."""
    names = input_names or contract_input_names(example_shape, latent_dim)
    rng = np.random.default_rng(seed)
    reqs: list[bytes] = []
    for _ in range(distinct):
        x = rng.random((rows, *example_shape), dtype=np.float32)   # (B, *example_shape), in [0, 1)
        z = rng.standard_normal((rows, latent_dim), dtype=np.float32)  # (B, d)
        msg: Any
        if rpc == "encode":
            msg = pb.EncodeRequest(x=to_tensor(x))
        elif rpc == "reconstruct":
            msg = pb.ReconstructRequest(x=to_tensor(x))
        elif rpc == "decode":
            msg = pb.DecodeRequest(z=to_tensor(z))
        elif rpc == "sample":
            msg = pb.SampleRequest(count=rows)  # the server draws the seed
        elif rpc in ("infer-encoder", "infer-decoder"):
            a, model = (x, "encoder") if rpc == "infer-encoder" else (z, "decoder")
            msg = oip_pb.ModelInferRequest(
                model_name=model, inputs=[oip_pb.ModelInferRequest.InferInputTensor(
                    name=names[model], datatype="FP32", shape=a.shape)],
                raw_input_contents=[a.astype(F32).tobytes()])
        else:
            raise BenchError(f"rpc: expected one of {sorted(RPCS)}, got {rpc!r}")
        reqs.append(msg.SerializeToString())
    return reqs


def build_http_requests(rpc: str, rows: int, example_shape: tuple[int, ...], latent_dim: int,
                        distinct: int = 16, seed: int = 0,
                        input_names: dict[str, str] | None = None) -> list[tuple[bytes, dict[str, str]]]:
    """`distinct` (body, headers) of POST /v2/models/{model}/infer, `rows` rows each: binary tensors in and
    out (`Inference-Header-Content-Length`), or JSON both ways. `input_names` as for `build_requests`."""
    model, binary = HTTP_RPCS[rpc]
    name = (input_names or contract_input_names(example_shape, latent_dim))[model]
    rng = np.random.default_rng(seed)
    tail = example_shape if model == "encoder" else (latent_dim,)
    reqs: list[tuple[bytes, dict[str, str]]] = []
    for _ in range(distinct):
        a = (rng.random((rows, *tail), dtype=np.float32) if model == "encoder"
             else rng.standard_normal((rows, *tail), dtype=np.float32))
        t: dict[str, Any] = {"name": name, "shape": list(a.shape), "datatype": "FP32"}
        if binary:
            t["parameters"] = {"binary_data_size": a.nbytes}
            head = json.dumps({"inputs": [t], "parameters": {"binary_data_output": True}}).encode()
            reqs.append((head + a.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                              "Content-Type": "application/octet-stream"}))
        else:
            t["data"] = a.ravel().tolist()
            reqs.append((json.dumps({"inputs": [t]}).encode(), {"Content-Type": "application/json"}))
    return reqs
