"""Helpers for starting and stopping the real processes that the soak benchmark
(study/bench_soak.py) and the tests run on 127.0.0.1: `ray start`, `mlflow server`, studies.
Stdlib only; each process is started in a session of its own so it can be killed whole."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

BIN = Path(sys.executable).parent   # this interpreter's scripts folder: ray, mlflow, moto_server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_session(sid: int) -> None:
    """SIGKILL every process in session `sid` (a process started with start_new_session=True
    and all it spawned), skipping those that are gone or not ours."""
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            if os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def wait_until(check: Callable[[], object], what: str, timeout: float = 90) -> None:
    """Poll `check` every 0.5 s until it is true (an OSError counts as not yet); raise
    RuntimeError naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up in {timeout:.0f} s")


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start `cmd` in a session of its own, stdout and stderr appended to `log`, with `env`
    added to this process's environment."""
    return subprocess.Popen(cmd, cwd=cwd, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
