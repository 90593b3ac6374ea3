"""What the reference launchers (triton.py, mlserver.py) share: free loopback ports, and running a server
process until SIGTERM/SIGINT with a ready file once it answers. Standard library only: the launchers
run in their own venvs and import this as a sibling module (`from launch import ...`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_until_stopped(proc: subprocess.Popen[bytes], ready_url: str, ready_file: Path, ports: dict[str, int],
                      ready_timeout_s: float) -> int:
    """Wait until `ready_url` answers 200, write `ready_file` ({**ports, pid: the server's, launcher_pid});
    then run until SIGTERM/SIGINT or the server exits, and stop it (SIGTERM, then kill after 30 s).
    0 if the server got ready, else 1."""
    stopping = [False]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.__setitem__(0, True))
    t0 = time.monotonic()
    ready = False
    while not ready and not stopping[0] and proc.poll() is None and time.monotonic() - t0 < ready_timeout_s:
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as r:
                ready = r.status == 200
        except OSError:
            time.sleep(0.25)
    if ready:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(json.dumps({**ports, "pid": proc.pid, "launcher_pid": os.getpid()}))
        tmp.replace(ready_file)
    while ready and not stopping[0] and proc.poll() is None:
        time.sleep(0.2)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return 0 if ready else 1
