"""What the generator sends: requests serialised once before the run, and the model's shapes."""

from __future__ import annotations

import json
from typing import Any

import grpc
import numpy as np

from loadgen.spec import HTTP_RPCS, RPCS, VAE, BenchError
from serving._proto.inference import grpc_service_pb2 as oip_pb
from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving.tensors import F32, to_tensor


def model_shapes(target: str, timeout_s: float = 10.0) -> tuple[tuple[int, ...], int] | None:
    """(example_shape, latent_dim) from GetModelInfo, or None when the server does not say (null server)."""
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
    if not info.example_shape:
        return None
    return tuple(int(s) for s in info.example_shape), int(info.latent_dim)


def build_requests(rpc: str, rows: int, example_shape: tuple[int, ...], latent_dim: int,
                   distinct: int = 16, seed: int = 0) -> list[bytes]:
    """`distinct` serialised requests of `rows` rows each, with different inputs (sent round-robin)."""
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
            a, model, name = (x, "encoder", "x") if rpc == "infer-encoder" else (z, "decoder", "z")
            msg = oip_pb.ModelInferRequest(
                model_name=model, inputs=[oip_pb.ModelInferRequest.InferInputTensor(
                    name=name, datatype="FP32", shape=a.shape)],
                raw_input_contents=[a.astype(F32).tobytes()])
        else:
            raise BenchError(f"rpc: expected one of {sorted(RPCS)}, got {rpc!r}")
        reqs.append(msg.SerializeToString())
    return reqs


def build_http_requests(rpc: str, rows: int, example_shape: tuple[int, ...], latent_dim: int,
                        distinct: int = 16, seed: int = 0) -> list[tuple[bytes, dict[str, str]]]:
    """`distinct` (body, headers) of POST /v2/models/{model}/infer, `rows` rows each: binary tensors in and
    out (`Inference-Header-Content-Length`), or JSON both ways."""
    model, binary = HTTP_RPCS[rpc]
    rng = np.random.default_rng(seed)
    name, tail = ("x", example_shape) if model == "encoder" else ("z", (latent_dim,))
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
