"""Loaded by the server under `python -m benchmarks.soak --tracemalloc-dir DIR` (this folder is put first on
its PYTHONPATH): when VAE_SOAK_TRACE_DIR is set, start tracemalloc and dump a snapshot there every
VAE_SOAK_TRACE_S seconds, from a daemon thread. Not part of the server: a diagnostic for the soak only.
"""

import os
import sys

_DIR = os.environ.get("VAE_SOAK_TRACE_DIR", "")
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

# VAE_SOAK_GC_DIR: every VAE_SOAK_GC_S seconds, a full collection that keeps what it found
# (gc.DEBUG_SAVEALL) and writes what the cycles were made of: the objects the cyclic collector freed, by
# type, with the bytes of the arrays among them (the server only, not the soak's own process).
_GC_DIR = os.environ.get("VAE_SOAK_GC_DIR", "")
if _GC_DIR and "serving" in sys.orig_argv:
    import collections
    import gc
    import threading
    import time

    def _cycles() -> None:
        n = 0
        while True:
            time.sleep(float(os.environ.get("VAE_SOAK_GC_S", "60")))
            n += 1
            gc.set_debug(gc.DEBUG_SAVEALL)
            found = gc.collect()
            gc.set_debug(0)
            kinds: collections.Counter[str] = collections.Counter()
            nbytes: collections.Counter[str] = collections.Counter()
            for o in gc.garbage:
                k = type(o).__qualname__
                kinds[k] += 1
                nbytes[k] += int(getattr(o, "nbytes", 0) or 0)
                if type(o).__name__ == "frame":
                    kinds["frame:" + o.f_code.co_qualname] += 1
            gc.garbage.clear()
            with open(os.path.join(_GC_DIR, f"{os.getpid()}-{n:03d}.txt"), "w") as f:
                f.write(f"collected {found}\n")
                for k, c in kinds.most_common(40):
                    f.write(f"{c:8d} {nbytes[k] / 2**20:9.2f} MB  {k}\n")

    threading.Thread(target=_cycles, name="soak-gc", daemon=True).start()
