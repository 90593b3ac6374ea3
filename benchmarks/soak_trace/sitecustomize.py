"""Loaded by the server under `python -m benchmarks.soak --tracemalloc-dir DIR` (this folder is put first on
its PYTHONPATH): when VAE_SOAK_TRACE_DIR is set, start tracemalloc and dump a snapshot there every
VAE_SOAK_TRACE_S seconds, from a daemon thread. Not part of the server: a diagnostic for the soak only.
"""

import os

_DIR = os.environ.get("VAE_SOAK_TRACE_DIR", "")  # a str for mypy in _dump below (narrowing ends there)
if _DIR:
    import threading
    import time
    import tracemalloc

    tracemalloc.start(int(os.environ.get("VAE_SOAK_TRACE_FRAMES", "12")))
    _EVERY = float(os.environ.get("VAE_SOAK_TRACE_S", "300"))

    def _dump() -> None:
        t0 = time.monotonic()
        n = 0
        while True:
            time.sleep(_EVERY)
            n += 1
            snap = tracemalloc.take_snapshot()
            tmp = os.path.join(_DIR, f".{os.getpid()}-{n:03d}.tmp")
            snap.dump(tmp)
            os.replace(tmp, os.path.join(_DIR, f"{os.getpid()}-{n:03d}-{(time.monotonic() - t0) / 60:05.1f}min.snap"))

    threading.Thread(target=_dump, name="soak-tracemalloc", daemon=True).start()
