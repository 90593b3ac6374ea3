"""The lower reference: what a first-timer writes. A grpcio *sync* server (ThreadPoolExecutor, 10 threads)
that answers only the Open Inference Protocol's ModelInfer, raw FP32 tensors, one ONNX Runtime run per
request, no batching, no validation beyond what it needs to run.

    python -m benchmarks.references.naive_server --model-dir EXPORTED --ready-file ready.json

Serves `encoder` and `decoder` from the export (every output of each graph, raw); loopback port 0 unless
`--port`; the ready file says the port; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from serving._proto.inference import grpc_service_pb2 as pb
from serving._proto.inference import grpc_service_pb2_grpc as pb_grpc
from serving.config import write_ready_file


class NaiveServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model_dir: Path, threads: int) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.sessions = {m: ort.InferenceSession(str(model_dir / f"{m}.onnx"), so, providers=["CPUExecutionProvider"])
                         for m in ("encoder", "decoder")}

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        sess = self.sessions.get(request.model_name)
        if sess is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name!r}")
            raise AssertionError("unreachable: abort raises")
        t = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(tuple(t.shape))
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, {t.name: x})
        resp = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name, o in zip(names, outs):
            resp.outputs.add(name=name, datatype="FP32", shape=o.shape)
            resp.raw_output_contents.append(o.tobytes())
        return resp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.references.naive_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=10, help="gRPC worker threads")
    p.add_argument("--intra-op-threads", type=int, default=1)
    p.add_argument("--ready-file", type=Path)
    args = p.parse_args(argv)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.threads),
                         options=[("grpc.max_receive_message_length", 64 << 20),
                                  ("grpc.max_send_message_length", 64 << 20)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(NaiveServicer(args.model_dir, args.intra_op_threads), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.ready_file is not None:
        write_ready_file(args.ready_file, port, -1)
    stop.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
