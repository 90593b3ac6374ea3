"""JSON of the Open Inference Protocol's REST API, as pure functions of bytes and arrays.

JSON is orjson's (about 10x faster than the standard library at writing float arrays, 2x at reading;
float32 values are written in their shortest form, which reads back to the same float32).
`serving.http` calls these inline for small bodies and in a worker process (`JsonPool`) for large
ones: parsing and numpy's list conversion hold the GIL for the whole of a 15 MB body (a few hundred
ms here), which a thread would not spare the event loop. This module imports nothing heavy (the worker
process is spawned and imports only what it needs); problems come back as `Problem` values, which the
caller raises as InvalidInput, so the messages are the same wherever the work ran.
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from serving.errors import InvalidInput, quote

F32 = np.dtype("<f4")


@dataclass(frozen=True)
class Problem:
    """A field that is not as required: what InvalidInput(field, expected, got) will say."""

    field: str
    expected: str
    got: str


def parse_request(head: bytes, binary: bool) -> dict[str, Any] | Problem:
    """The JSON request; each input's `data` (when present and a list) replaced by float32 bytes under
    "_data", or by a Problem under "_problem"."""
    try:
        req = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        if "UTF-8" in str(e):
            return Problem("body", "a JSON inference request", "bytes that are not UTF-8")
        where = " in the bytes before the binary tensors (Inference-Header-Content-Length)" if binary else ""
        return Problem("body", "a JSON inference request" + where, f"text that does not parse ({e})")
    if not isinstance(req, dict):
        return Problem("body", "a JSON object", type(req).__name__)
    inputs = req.get("inputs")
    if isinstance(inputs, list):
        for t in inputs:
            if isinstance(t, dict) and isinstance(t.get("data"), list):
                values = t.pop("data")
                where = f"inputs[{str(t.get('name'))!r}].data"
                out = float32_bytes(values, where)
                t["_problem" if isinstance(out, Problem) else "_data"] = out
    return req


def float32_bytes(values: list[Any], where: str) -> bytes | Problem:
    """A JSON tensor's values (flat or evenly nested, row-major) as float32 bytes; numbers only."""
    try:
        a = np.asarray(values)
    except ValueError:
        return Problem(where, "a flat or evenly nested list of numbers", "a ragged list")
    kind = a.dtype.kind
    if kind not in "fiu":
        got = {"b": "true/false values", "U": "strings", "S": "strings", "O": "a ragged list or mixed values"}
        return Problem(where, "numbers", got.get(kind, f"{a.dtype.name} values"))
    if kind != "f" and a.size and not (np.abs(a) < 2**53).all():  # ints beyond float64: would lose value
        return Problem(where, "numbers a float32 can hold", "integers too large")
    return a.astype(F32, copy=False).tobytes()


def encode_response(resp: dict[str, Any]) -> bytes:
    """The JSON of a response whose outputs' `data` are float32 arrays (written flat, row-major, as
    Triton does)."""
    for meta in resp["outputs"]:
        if isinstance(meta.get("data"), np.ndarray):
            meta["data"] = np.ascontiguousarray(meta["data"], dtype=F32).ravel()
    return orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)


class JsonPool:
    """One spawned worker process for large JSON bodies and answers, started on first use."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def field(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str, expected: str,
           model: str | None, default: Any = None, required: bool = False) -> Any:
    """obj[key] checked against `typ` (bool is not an int here); InvalidInput naming `where`."""
    if key not in obj:
        if required:
            raise InvalidInput(where, expected, "nothing", model)
        return default
    v = obj[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,))):
        raise InvalidInput(where, expected, shown(v), model)
    return v


def shown(v: Any) -> str:
    """A JSON value as an error message quotes it (cut short)."""
    return quote(orjson.dumps(v).decode()[:400])


def timeout_of(params: dict[str, Any], header: str | None, header_name: str, model: str) -> float | None:
    """A REST infer request's timeout in seconds: the header (milliseconds) over `parameters.timeout`
    (microseconds, as tritonclient sends it); None without either. InvalidInput for one that is not > 0."""
    timeout_s: float | None = None
    t_us = field(params, "timeout", (int, float), "parameters.timeout", "microseconds, a number > 0", model)
    if t_us is not None:
        timeout_s = float(t_us) * 1e-6
    if header is not None:
        try:
            timeout_s = float(header) * 1e-3
        except ValueError:
            timeout_s = -1.0
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise InvalidInput(header_name, "milliseconds, a number > 0", quote(repr(header)), model)
    if timeout_s is None:
        return None
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise InvalidInput("parameters.timeout", "microseconds, a number > 0", repr(t_us), model)
    return timeout_s
