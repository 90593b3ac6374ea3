"""NVIDIA Triton 2.51 as a reference: the `tritonserver` binary and python backend bundled in the
`nvidia-pytriton==0.7.0` wheel, run directly on a generated model repository whose python-backend
model (triton_model.py) runs the export's ONNX graphs with ONNX Runtime, one intra-op thread, dynamic
batching (750 us, max batch 512). Run it with the Python of a venv holding nvidia-pytriton and
onnxruntime (`scripts/ensure_reference_venvs.sh` makes `.venv-triton`; PyTriton pins numpy < 2, so it
lives apart from the project's venv):

    .venv-triton/bin/python benchmarks/references/triton.py --model-dir EXPORTED --ready-file ready.json

Standard library only (no project imports: another venv). Binds loopback ports it picks, writes the
ready file `{grpc_port, http_port, metrics_port, pid}` (pid: tritonserver's) once /v2/health/ready
answers 200, and stops Triton on SIGTERM/SIGINT. Two things make the python backend load here: the
running interpreter's libpython comes first in LD_LIBRARY_PATH (else the stub may pick the system's
copy and fail with "'_thread.RLock' object has no attribute '_recursion_count'"), and this venv's bin
comes first in PATH (that is how the stub finds the venv's site-packages).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from launch import free_port, run_until_stopped  # a sibling module: these scripts run from this folder

HERE = Path(__file__).resolve().parent


def config_pbtxt(name: str, graph: dict, onnx_path: Path, max_batch: int, delay_us: int | None, threads: int) -> str:
    """The model's config.pbtxt; `delay_us` None = no dynamic batching (each request is its own batch)."""
    def dims(spec: dict) -> str:
        return ", ".join(str(d) for d in spec["shape"][1:])  # without the batch dimension

    inputs = ",\n".join(f'  {{ name: "{t["name"]}" data_type: TYPE_FP32 dims: [ {dims(t)} ] }}' for t in graph["inputs"])
    outputs = ",\n".join(f'  {{ name: "{t["name"]}" data_type: TYPE_FP32 dims: [ {dims(t)} ] }}' for t in graph["outputs"])
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            + (f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n" if delay_us is not None else "")
            + 
            f"instance_group [ {{ count: 1 kind: KIND_CPU }} ]\n"
            f'parameters {{ key: "onnx_path" value {{ string_value: "{onnx_path}" }} }}\n'
            f'parameters {{ key: "intra_op_threads" value {{ string_value: "{threads}" }} }}\n')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True, help="a vae-serve export (model.json + ONNX files)")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench/triton"), help="recreated at each start")
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--max-batch-size", type=int, default=512)
    p.add_argument("--max-queue-delay-us", type=int, default=750)
    p.add_argument("--no-dynamic-batching", action="store_true",
                   help="no dynamic batching: Triton 2.51's python backend crashed (SIGSEGV) on ModelStreamInfer "
                        "with it on, so streams are measured with it off")
    p.add_argument("--intra-op-threads", type=int, default=1)
    p.add_argument("--ready-timeout-s", type=float, default=180.0)
    args = p.parse_args(argv)

    import pytriton  # only to find the bundled server

    tsrv = Path(pytriton.__file__).resolve().parent / "tritonserver"
    stub = tsrv / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    if not stub.exists():
        sys.exit(f"triton: no python backend stub for this Python in {stub.parent.parent}")
    manifest = json.loads((args.model_dir / "model.json").read_text())
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    backend = work / "backends" / "python"
    backend.mkdir(parents=True)
    for f in (tsrv / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, backend / f.name)
    shutil.copy2(stub, backend / "triton_python_backend_stub")
    for name in ("encoder", "decoder"):
        (work / "models" / name / "1").mkdir(parents=True)
        shutil.copy2(HERE / "triton_model.py", work / "models" / name / "1" / "model.py")
        onnx = (args.model_dir / manifest["files"][name]["path"]).resolve()
        (work / "models" / name / "config.pbtxt").write_text(config_pbtxt(
            name, manifest[name], onnx, args.max_batch_size,
            None if args.no_dynamic_batching else args.max_queue_delay_us, args.intra_op_threads))

    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = dict(os.environ)
    libs = tsrv.parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = ":".join(x for x in (sysconfig.get_config_var("LIBDIR") or "", str(libs),
                                                  env.get("LD_LIBRARY_PATH", "")) if x)
    env["PATH"] = os.path.dirname(sys.executable) + ":" + env.get("PATH", "")
    cmd = [str(tsrv / "bin" / "tritonserver"), "--model-repository", str(work / "models"),
           "--backend-directory", str(work / "backends"),
           "--http-address", "127.0.0.1", "--http-port", str(http_port),
           "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
           "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics_port),
           "--allow-gpu-metrics", "false", "--allow-cpu-metrics", "false", "--allow-sagemaker", "false",
           "--allow-vertex-ai", "false", "--strict-model-config", "true", "--log-verbose", "0",
           "--backend-config", "python,shm-default-byte-size=33554432", "--exit-timeout-secs", "10"]
    proc = subprocess.Popen(cmd, env=env)
    return run_until_stopped(proc, f"http://127.0.0.1:{http_port}/v2/health/ready", args.ready_file,
                             {"grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port},
                             args.ready_timeout_s)


if __name__ == "__main__":
    raise SystemExit(main())
