"""Seldon MLServer 1.7 as a reference (the Python Open Inference Protocol server behind KServe's V2
runtimes): a generated model repository whose custom runtime runs the export's ONNX graphs with ONNX
Runtime (one intra-op thread), MLServer's adaptive batching (max batch 512, 750 us, like Triton's delay),
inference in the serving process (`parallel_workers` 0). Run it with the Python of a venv holding
`mlserver==1.7.1 onnxruntime==1.32.0` (`scripts/ensure_reference_venvs.sh` makes `.venv-mlserver`):

    .venv-mlserver/bin/python benchmarks/references/mlserver.py --model-dir EXPORTED --ready-file ready.json

Standard library only (another venv). Binds loopback ports it picks, writes the ready file
`{grpc_port, http_port, metrics_port, pid, launcher_pid}` (pid: the mlserver process) once
/v2/health/ready answers 200, and stops MLServer on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from launch import free_port, run_until_stopped  # a sibling module: these scripts run from this folder

RUNTIME = '''
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OrtModel(MLModel):
    async def load(self) -> bool:
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(self.settings.parameters.extra.get("threads", 1))
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(self.settings.parameters.uri, so, providers=["CPUExecutionProvider"])
        self.in_name = self.sess.get_inputs()[0].name
        self.out_names = [o.name for o in self.sess.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        outs = self.sess.run(self.out_names, {self.in_name: x})
        return InferenceResponse(model_name=self.name,
                                 outputs=[NumpyCodec.encode_output(n, o) for n, o in zip(self.out_names, outs)])
'''


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True, help="a vae-serve export (model.json + ONNX files)")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench/mlserver"), help="recreated at each start")
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--max-batch-size", type=int, default=512)
    p.add_argument("--max-queue-delay-us", type=int, default=750)
    p.add_argument("--intra-op-threads", type=int, default=1)
    p.add_argument("--ready-timeout-s", type=float, default=180.0)
    args = p.parse_args(argv)
    manifest = json.loads((args.model_dir / "model.json").read_text())
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "ort_runtime.py").write_text(RUNTIME)
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    (work / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port,
        "parallel_workers": 0, "debug": False}))
    for name in ("encoder", "decoder"):
        (work / name).mkdir()
        onnx = (args.model_dir / manifest["files"][name]["path"]).resolve()
        (work / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "ort_runtime.OrtModel",
            "max_batch_size": args.max_batch_size, "max_batch_time": args.max_queue_delay_us * 1e-6,
            "parameters": {"uri": str(onnx), "extra": {"threads": args.intra_op_threads}}}))
    env = dict(os.environ, PYTHONPATH=str(work))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlserver"), "start", str(work)], cwd=work, env=env)
    return run_until_stopped(proc, f"http://127.0.0.1:{http_port}/v2/models/decoder/ready", args.ready_file,
                             {"grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port},
                             args.ready_timeout_s)


if __name__ == "__main__":
    raise SystemExit(main())
