"""Shared test setup. Tests run on small tensors on a shared 2-core machine: one intra-op
thread avoids OpenMP spin-waiting against other processes (and makes timings steadier).

Also plain helpers the tests import (`from conftest import …`): waiting for a study's
checkpoints while its driver runs, and a real MLflow client with a write that fails on cue."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable, Collection

import torch

torch.set_num_threads(1)


def checkpoints(folder: Path, name: str) -> list[Path]:
    """Study `name`'s checkpoint folders under the local default storage in `folder`."""
    return list((folder / "ray_results" / name).glob("*/checkpoint_*"))


def wait_for_checkpoints(listing: Callable[[], Collection], driver: subprocess.Popen, log: Path,
                         at_least: int = 1, timeout: float = 240, poll: float = 0.3) -> None:
    """Poll `listing` (checkpoints on whatever storage) every `poll` s until it holds
    `at_least` entries. Fails the test, with the driver's `log`, if the driver exits first
    or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while len(listing()) < at_least:
        assert driver.poll() is None, \
            f"the driver exited ({driver.returncode}) before {at_least} checkpoint(s):\n{log.read_text()}"
        assert time.time() < deadline, f"fewer than {at_least} checkpoint(s) after {timeout:.0f} s:\n{log.read_text()}"
        time.sleep(poll)


class Flaky:
    """A real MLflow client whose `method` fails, as a dropped connection would, on its next
    `failures` calls (set `failures` to cut the store off or bring it back); every other call,
    and every call once the failures are spent, goes to the real client. With `answer_lost`
    the failing call first reaches the store and then fails, as when the server goes down
    between doing a write and answering it."""

    def __init__(self, real, method: str, failures: int = 1, answer_lost: bool = False) -> None:
        self.real, self.method, self.failures, self.answer_lost = real, method, failures, answer_lost

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if name != self.method:
            return attr

        def call(*args, **kwargs):
            if self.failures > 0:
                self.failures -= 1
                if self.answer_lost:
                    attr(*args, **kwargs)
                raise ConnectionResetError("connection reset by peer")
            return attr(*args, **kwargs)
        return call
