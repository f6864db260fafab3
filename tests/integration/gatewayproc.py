"""Running ``tunlwip up`` as a real process in a test namespace, shared by the gateway tests.

Why: several test modules start the gateway the same way (fresh TUN name, debug log in a file,
"serving" once the ``up:`` line is logged, SIGTERM with exit status 0 at teardown); one copy
keeps them in step. The pytest fixtures built on this live in conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from netns import Namespace

__all__ = [
    "GATEWAY_CMD",
    "LOG_TAIL",
    "LoggedProcess",
    "RunningGateway",
    "StartGateway",
    "launch_gateway",
    "pattern",
    "wait_for",
]

GATEWAY_CMD = [sys.executable, "-m", "tunlwip", "up"]
LOG_TAIL = 4000


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` every 50 ms for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def pattern(seed: int, size: int) -> bytes:
    """Deterministic bytes without short periods, so loss, duplication or reordering show."""
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)


@dataclass
class LoggedProcess:
    """A process in a test namespace (with its TUN ``iface``) whose stdout and stderr go to
    ``log_path``; it must stop on SIGTERM with exit status 0."""

    ns: Namespace
    iface: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    returncode: int | None = None
    #: How logs and failures name it.
    what: ClassVar[str] = "process"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self) -> str:
        return f"{self.what} log (tail):\n{self.log()[-LOG_TAIL:]}"

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM (once); require exit status 0 within ``timeout`` s."""
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.returncode = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.returncode = self.proc.wait()
                raise AssertionError(
                    f"{self.what} ignored SIGTERM for {timeout}s; {self.tail()}"
                ) from None
        assert self.returncode == 0, f"{self.what} exited {self.returncode}; {self.tail()}"


@dataclass
class RunningGateway(LoggedProcess):
    """One ``tunlwip up`` process."""

    what: ClassVar[str] = "gateway"

    def wait_serving(self) -> None:
        """Wait until the gateway serves and its TUN is up; fail if it exits first."""

        def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}; {self.tail()}")
            # Logged once the TUN exists, has its MTU, is up and lwIP runs: safe to move it.
            return f"up: iface {self.iface} " in self.log()

        wait_for(serving, f"the gateway on {self.iface}")
        link = self.ns.ip("link", "show", "dev", self.iface).stdout
        assert ",UP" in link, link

    def status(self) -> dict[str, Any]:
        """``tunlwip status --iface IFACE --json`` (the control socket is a file: any
        namespace can ask): version, totals, drops and the open flows."""
        result = subprocess.run([sys.executable, "-m", "tunlwip", "status", "--iface",
                                 self.iface, "--json"], capture_output=True, text=True,
                                timeout=30)  # fmt: skip
        assert result.returncode == 0, f"{result.stderr}\n{self.tail()}"
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc

    def stop(self, timeout: float = 10.0) -> str:
        """SIGTERM; require exit status 0 within ``timeout`` s. Returns the "stopped" line."""
        self.terminate(timeout)
        json_stop = ('"logger": "tunlwip"', '"message": "stopped')  # --log-format json
        lines = [line for line in self.log().splitlines() if "tunlwip: stopped" in line
                 or all(part in line for part in json_stop)]  # fmt: skip
        assert lines, f"no 'stopped' line; {self.tail()}"
        return lines[-1]


#: ``start(ns, *args)`` for start_gateway, ``start(*args)`` for split_gateway.
StartGateway = Callable[..., RunningGateway]


def launch_gateway(
    ns: Namespace, iface: str, log_path: Path, *args: str, wrapper: Sequence[str] = ()
) -> RunningGateway:
    """Start ``tunlwip up --iface iface *args`` in ``ns``; see RunningGateway.wait_serving.
    ``wrapper`` goes in front of the command (``prlimit --nofile=...``: it execs it, so the
    process is still the gateway's)."""
    with log_path.open("wb") as log:
        proc = ns.popen(
            [*wrapper, *GATEWAY_CMD, "--iface", iface, "--log-level", "debug", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return RunningGateway(ns, iface, proc, log_path)
