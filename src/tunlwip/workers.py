"""``tunlwip up --workers N``: a supervisor and N worker processes, one TUN queue each.

Theory of operation
-------------------
One gateway process uses one core. With ``device.workers`` N > 1 the TUN is opened with
``IFF_MULTI_QUEUE`` N times (N queues of one device) and N workers each run a whole gateway
(lwIP, the C relay, UDP, ICMP, the DNS proxy and its cache, their limits) on one queue. The
kernel picks a flow's queue by the flow's hash, and afterwards by the queue that last wrote
the flow's packets, so a connection stays with the worker whose lwIP holds it.

**The supervisor opens the queues and keeps them** (the workers get theirs with ``pass_fds``):

- a worker that dies does not take its queue away, so the number of queues, their order and
  the flow-to-queue mapping do not change: the other workers' flows, idle ones included, stay
  where they are (a queue closing would renumber the rest and send some of their flows to a
  worker that never saw them, which answers with a reset);
- the restarted worker gets the same queue back; what arrived meanwhile (packets of its lost
  flows) it answers with resets, so clients learn at once;
- the device, its MTU, queue length and link state are set once, and the device (if the
  supervisor created it) goes away with the supervisor's last fd: nothing is left behind.

**Workers** are ``python -m tunlwip up`` again with the same arguments (so the same file and
flags, and a SIGHUP re-reads the same) plus hidden ones naming the queue's fd, the worker's
index and a private runtime directory (mode 0700) for its control socket and its final totals
(``WorkerRole``). They run in their own session, so a terminal's Ctrl-C reaches only the
supervisor, which forwards it once. Each also inherits the read end of a pipe whose write end
only the supervisor holds (the lifeline): when the supervisor dies, even by SIGKILL, the pipe
reads EOF and the worker stops as on SIGTERM. (Not ``PR_SET_PDEATHSIG``: it fires when the
*thread* that forked exits, and trio starts processes from its thread cache.) Only the
supervisor talks to systemd: the workers' environment has no ``NOTIFY_SOCKET`` or
``WATCHDOG_*``.

**Status.** The supervisor owns the control socket (and the metrics endpoint): a ``status``
asks every worker's own socket at once and merges (``statusmerge.py``). Every
``POLL_INTERVAL`` it asks each worker for its counters; a worker's last report says how many
flows a crash lost, and keeps its counters (``RetiredTotals``) so merged totals never go back.

**Signals.** SIGHUP: the configuration is loaded and checked first; a bad one is logged and
nobody is signalled; else the supervisor reopens its log and forwards SIGHUP to every worker,
which reloads as one gateway does. SIGTERM/SIGINT: SIGTERM to every worker, which drains
(``limits.grace``) and writes its final totals; the supervisor logs the merged stop lines.

**Crashes.** A worker that exits while the supervisor is not stopping is logged with its exit
status; its last reported open flows are counted as lost (``worker_flows_lost``) and it is
started again on its queue after a backoff (``RESTART_DELAYS``; back to the first after
``BACKOFF_RESET`` seconds of running). The others go on. A worker that fails before the
gateway ever served (a bad address, no permission) stops the whole start, with its exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from . import __version__, control, service
from .config import Settings
from .device import TunDevice
from .device.tun import IFF_VNET_HDR, negotiate_offloads
from .errors import ConfigError, DeviceError, TunlwipError
from .stats import stop_lines
from .statusmerge import RetiredTotals, add_numbers, flows_live, merge_documents

if TYPE_CHECKING:
    from .cli import Reloader

__all__ = ["Supervisor", "WorkerRole", "worker_arguments"]

log = logging.getLogger("tunlwip")

#: Seconds between the supervisor's questions to each worker (counters only, no flows).
POLL_INTERVAL = 2.0
#: Seconds a worker gets to answer on its control socket after it starts.
STARTUP_TIMEOUT = 60.0
#: Seconds a worker gets beyond ``limits.grace`` to exit on SIGTERM before SIGKILL.
STOP_MARGIN = 10.0
#: Waits before starting a crashed worker again: the first, then doubling up to the last.
RESTART_DELAYS = (0.5, 30.0)
#: Seconds of running after which a crash starts the backoff from the beginning again.
BACKOFF_RESET = 60.0
#: What a worker's environment must not have: only the supervisor talks to systemd.
_SUPERVISOR_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                        "LISTEN_PID", "LISTEN_FDNAMES")  # fmt: skip
TUNGETIFF = 0x800454D2


# -- the worker's side -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """What makes a ``tunlwip up`` process a worker: its index, its queue's fd and the
    lifeline's read end (both inherited), and the supervisor's private runtime directory."""

    index: int
    queue_fd: int
    lifeline_fd: int
    runtime_dir: Path

    @property
    def control_socket(self) -> Path:
        return socket_path(self.runtime_dir, self.index)

    def adopt_queue(self) -> TunDevice:
        """The inherited queue as the gateway's device: its name and whether it carries a
        virtio-net header come from the fd itself (TUNGETIFF), as the supervisor opened it."""
        try:
            ifr = fcntl.ioctl(self.queue_fd, TUNGETIFF, bytes(40))
        except OSError as exc:
            raise DeviceError(f"worker {self.index}: fd {self.queue_fd} is no TUN queue: "
                              f"{exc.strerror}") from exc  # fmt: skip
        name = ifr[:16].rstrip(b"\0").decode()
        vnet_header = bool(struct.unpack_from("H", ifr, 16)[0] & IFF_VNET_HDR)
        # Offloads are the device's: asking again gets the set the supervisor negotiated (the
        # kernel has no call that reads it back), and without knowing it this worker would drop
        # every super-segment the kernel hands its queue.
        try:
            offloads = negotiate_offloads(self.queue_fd) if vnet_header else 0
        except OSError as exc:
            raise DeviceError(f"worker {self.index}: cannot read the offloads of {name}: "
                              f"{exc.strerror}") from exc  # fmt: skip
        return TunDevice.from_fd(self.queue_fd, name=name, vnet_header=vnet_header,
                                 offloads=offloads)  # fmt: skip

    async def watch_supervisor(self) -> None:
        """Stop this worker (as SIGTERM does: drain) once the supervisor is gone: the
        lifeline then reads EOF. Runs until then or until cancelled."""
        os.set_blocking(self.lifeline_fd, False)
        await trio.lowlevel.wait_readable(self.lifeline_fd)
        log.warning("the supervisor is gone: stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    def write_totals(self, totals: dict[str, Any], drops: dict[str, Any], drained: bool) -> None:
        """The final counters, for the supervisor's stop log (written just before exit)."""
        path = totals_path(self.runtime_dir, self.index)
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps({"totals": totals, "drops": drops,
                                             "drained": drained}))  # fmt: skip
            temporary.replace(path)
        except OSError as exc:  # the supervisor then counts this worker's last report
            log.warning("cannot leave the final counters in %s: %s", path, exc.strerror)


def socket_path(runtime_dir: Path, index: int) -> Path:
    return runtime_dir / f"worker-{index}.sock"


def totals_path(runtime_dir: Path, index: int) -> Path:
    return runtime_dir / f"worker-{index}.totals.json"


def worker_arguments(role: WorkerRole) -> list[str]:
    """The hidden flags that make ``tunlwip up`` this worker (``cli.add_worker_arguments``)."""
    return ["--worker-index", str(role.index), "--worker-fd", str(role.queue_fd),
            "--worker-lifeline", str(role.lifeline_fd),
            "--worker-dir", str(role.runtime_dir)]  # fmt: skip


# -- the supervisor --------------------------------------------------------------------------


@dataclasses.dataclass
class Worker:
    """The supervisor's view of one worker: its queue, its process and what it last said."""

    index: int
    queue: TunDevice
    role: WorkerRole
    process: trio.Process | None = None
    ready: bool = False
    restarts: int = 0
    flows_lost: int = 0
    #: Its last status document (counters, no flows); None before it answered.
    last: dict[str, Any] | None = None
    started_at: float = 0.0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def detail(self) -> dict[str, Any]:
        """The per-worker entry of the merged status (``workers``)."""
        flows = ((self.last or {}).get("totals") or {}).get("flows") or {}
        state = "running" if self.ready else ("starting" if self.running else "restarting")
        return {
            "index": self.index,
            "pid": self.process.pid if self.running and self.process else None,
            "state": state,
            "restarts": self.restarts,
            "flows_lost": self.flows_lost,
            "flows_live": flows_live(self.last),
            "flows_tcp": flows.get("tcp", 0),
            "flows_udp": flows.get("udp", 0),
            "uptime": round(time.monotonic() - self.started_at, 3) if self.ready else 0.0,
            "rss_bytes": ((self.last or {}).get("process") or {}).get("rss_bytes"),
            "control_socket": str(self.role.control_socket),
        }


class _StartFailed(TunlwipError):
    """A worker ended before every worker served; ``code`` is its exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Supervisor:
    """Runs ``settings.workers`` workers on one multi-queue TUN (see the module's docstring).
    ``argv``: the ``up`` command line the workers repeat (``["up", "--iface", "t0", ...]``)."""

    def __init__(self, settings: Settings, reloader: Reloader, argv: list[str], *,
                 control_socket: str | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.reloader = reloader
        self.argv = list(argv)
        self.control_socket = control_socket
        self.workers: list[Worker] = []
        self.retired = RetiredTotals()
        self.stopping = False
        self.served = False
        self.failure: _StartFailed | None = None
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        self.iface = settings.iface
        self._lifeline = (-1, -1)

    # -- the control socket's questions --

    async def status_document(self, max_flows: int) -> dict[str, Any]:
        """The merged status (``control.StatusSource``): every serving worker asked at once;
        one that does not answer in time counts with its last report, without its flows."""
        documents: dict[int, dict[str, Any]] = {}

        async def ask(worker: Worker) -> None:
            try:
                with trio.fail_after(control.REQUEST_TIMEOUT / 2):
                    document = await control.request_async(
                        worker.role.control_socket, {"cmd": "status", "max_flows": max_flows}
                    )
                documents[worker.index] = document
                worker.last = {key: value for key, value in document.items() if key != "flows"}
            except (OSError, ValueError, trio.TooSlowError):
                if worker.last is not None:
                    documents[worker.index] = worker.last

        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                if worker.ready:
                    nursery.start_soon(ask, worker)
        merged = merge_documents(
            sorted(documents.items()),
            self.retired,
            own_process=control.process_usage(),
            max_flows=max_flows,
        )
        uptime = round(time.monotonic() - self._started_monotonic, 3)
        merged["totals"]["uptime"] = uptime
        return {
            "version": __version__,
            "iface": self.iface,
            "pid": os.getpid(),
            "started": self.started,
            "uptime": uptime,
            **merged,
            "supervisor": {
                "pid": os.getpid(),
                "workers": len(self.workers),
                "workers_running": sum(1 for w in self.workers if w.ready),
                "worker_restarts": sum(w.restarts for w in self.workers),
                "flows_lost": sum(w.flows_lost for w in self.workers),
            },
            "workers": [worker.detail() for worker in self.workers],
        }

    # -- running --

    async def run(self) -> int:
        """Open the queues, start the workers, serve until SIGINT/SIGTERM; the exit code."""
        from .cli import EXIT_FAILURE, EXIT_OK, set_link_up

        settings = self.settings
        runtime_dir = Path(tempfile.mkdtemp(prefix=f"tunlwip-{settings.iface}-"))
        self._lifeline = os.pipe()  # the write end never leaves this process
        try:
            self._open_queues(runtime_dir)
            name = self.workers[0].queue.name
            self.iface = name
            try:
                set_link_up(name, settings.gateway.stack.mtu, settings.effective_txqueuelen)
            except OSError as exc:
                raise DeviceError(f"cannot configure {name}: {exc.strerror}") from exc
            async with trio.open_nursery() as nursery:
                for worker in self.workers:
                    nursery.start_soon(self._keep_running, worker)
                try:
                    await self._wait_ready()
                    await self._serve(nursery)
                except _StartFailed as exc:
                    log.error("cannot start: %s", exc)
                    await self._stop_workers()
                    nursery.cancel_scope.cancel()
                    return exc.code
                except (OSError, TunlwipError) as exc:
                    log.error("cannot start: %s", exc)
                    await self._stop_workers()
                    nursery.cancel_scope.cancel()
                    return EXIT_FAILURE
                nursery.cancel_scope.cancel()
            return EXIT_OK
        finally:
            for worker in self.workers:
                await worker.queue.aclose()
            shutil.rmtree(runtime_dir, ignore_errors=True)
            for fd in self._lifeline:
                os.close(fd)

    def _open_queues(self, runtime_dir: Path) -> None:
        try:
            for index in range(self.settings.workers):
                queue = TunDevice.open(self.settings.iface, offload=self.settings.offload,
                                       multi_queue=True)  # fmt: skip
                role = WorkerRole(index, queue.fileno(), self._lifeline[0], runtime_dir)
                self.workers.append(Worker(index, queue, role))
        except BaseException:
            for worker in self.workers:
                os.close(worker.queue.fileno())
            self.workers.clear()
            raise

    def _command(self, worker: Worker) -> list[str]:
        return [sys.executable, "-m", "tunlwip", *self.argv, *worker_arguments(worker.role)]

    async def _keep_running(self, worker: Worker) -> None:
        """Start the worker, and again each time it ends unexpectedly, until stopping."""
        environment = {k: v for k, v in os.environ.items() if k not in _SUPERVISOR_ONLY_ENV}
        delay = RESTART_DELAYS[0]
        while not self.stopping:
            worker.ready, worker.last = False, None
            worker.started_at = time.monotonic()
            with contextlib.suppress(FileNotFoundError):
                worker.role.control_socket.unlink()
            worker.process = await trio.lowlevel.open_process(
                self._command(worker),
                pass_fds=(worker.role.queue_fd, worker.role.lifeline_fd),
                env=environment,
                start_new_session=True, stdin=subprocess.DEVNULL)  # fmt: skip
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poll, worker)
                code = await worker.process.wait()
                nursery.cancel_scope.cancel()
            worker.ready = False
            if self.stopping:
                return
            how = _exit_text(code)
            if not self.served:
                self.failure = _StartFailed(f"worker {worker.index} {how} before serving",
                                            code if code > 0 else 1)  # fmt: skip
                return
            lost = flows_live(worker.last)
            self.retired.retire(worker.last)
            worker.restarts += 1
            worker.flows_lost += lost
            if time.monotonic() - worker.started_at >= BACKOFF_RESET:
                delay = RESTART_DELAYS[0]
            log.error("worker %d (pid %d) %s: its %d open flows are lost; starting it again "
                      "on its queue in %g s (restart %d)", worker.index, worker.process.pid,
                      how, lost, delay, worker.restarts)  # fmt: skip
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAYS[1])

    async def _poll(self, worker: Worker) -> None:
        """Ask the worker for its counters: quickly until it first answers, then every
        POLL_INTERVAL."""
        while True:
            try:
                with trio.fail_after(control.REQUEST_TIMEOUT):
                    worker.last = await control.request_async(
                        worker.role.control_socket, {"cmd": "status", "max_flows": 0}
                    )
                if not worker.ready:
                    worker.ready = True
                    if self.served:
                        log.info("worker %d (pid %d) serving again", worker.index,
                                 worker.process.pid if worker.process else 0)  # fmt: skip
            except (OSError, ValueError, trio.TooSlowError):
                pass
            await trio.sleep(POLL_INTERVAL if worker.ready else 0.05)

    async def _wait_ready(self) -> None:
        with trio.move_on_after(STARTUP_TIMEOUT):
            while not all(worker.ready for worker in self.workers):
                if self.failure is not None:
                    raise self.failure
                await trio.sleep(0.05)
            self.served = True
            return
        raise _StartFailed(f"the workers did not answer within {STARTUP_TIMEOUT:g} s", 1)

    async def _serve(self, nursery: trio.Nursery) -> None:
        settings = self.settings
        socket_path = await nursery.start(functools.partial(
            control.serve_control, self, self.control_socket, iface=self.iface))  # fmt: skip
        if settings.metrics_listen:
            from . import metrics

            serve = functools.partial(metrics.serve_metrics, self, settings.metrics_listen,
                                      iface=self.iface)  # fmt: skip
            address, port = await nursery.start(serve)
            host = f"[{address}]" if ":" in address else address
            log.info("metrics on http://%s:%d/metrics", host, port)
        pids = ", ".join(str(w.process.pid) for w in self.workers if w.process)
        log.info("up: iface %s workers %d (pids %s) mtu %d config %s; control socket %s",
                 self.iface, len(self.workers), pids, settings.gateway.stack.mtu,
                 settings.source or "none", socket_path)  # fmt: skip
        service.ready(f"serving {self.iface} with {len(self.workers)} workers")
        if (interval := service.watchdog_interval()) is not None:
            log.info("systemd watchdog: pinging every %g s", interval / 2)
            nursery.start_soon(service.watchdog, interval)
        current = settings
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    current = self._reload(current)
                    continue
                flows = sum(flows_live(w.last) for w in self.workers)
                log.info("%s: stopping %d workers, giving about %d flows %g s",
                         signal.Signals(signum).name, len(self.workers), flows,
                         current.grace)  # fmt: skip
                service.stopping(f"stopping: {flows} flows get {current.grace:g} s")
                break
        self.settings = current
        await self._stop_workers()
        self._log_totals()

    def _reload(self, current: Settings) -> Settings:
        """SIGHUP: check the configuration, then forward; a bad one reaches no worker."""
        service.reloading()
        try:
            new = self.reloader.load()
        except ConfigError as exc:
            log.error("reload: configuration not reloaded, keeping the old one (workers not "
                      "signalled): %s", exc)  # fmt: skip
            service.ready(f"serving {self.iface}")
            return current
        try:
            service.configure_logging(new.log_level, new.log_file, new.log_format)
        except OSError as exc:
            log.error("reload: logging.file: cannot open %s (%s); logging unchanged",
                      new.log_file, exc.strerror)  # fmt: skip
        signalled = 0
        for worker in self.workers:
            if worker.running and worker.process is not None:
                worker.process.send_signal(signal.SIGHUP)
                signalled += 1
        log.info("reload: configuration checked; SIGHUP sent to %d workers", signalled)
        service.ready(f"serving {self.iface} with {len(self.workers)} workers")
        return new

    async def _stop_workers(self) -> None:
        """SIGTERM every worker; SIGKILL those still there after the grace period and
        STOP_MARGIN."""
        self.stopping = True
        for worker in self.workers:
            if worker.running and worker.process is not None:
                worker.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.settings.grace + STOP_MARGIN):
            for worker in self.workers:
                if worker.process is not None:
                    await worker.process.wait()
        for worker in self.workers:
            if worker.running and worker.process is not None:
                log.error("worker %d (pid %d) did not stop: killed", worker.index,
                          worker.process.pid)  # fmt: skip
                worker.process.kill()
                await worker.process.wait()

    def _log_totals(self) -> None:
        """The stop lines of the merged final totals (a worker's file, else its last report)."""
        totals: dict[str, Any] = {}
        drained = True
        for worker in self.workers:
            final = _read_json(totals_path(worker.role.runtime_dir, worker.index))
            if final is None:
                self.retired.retire(worker.last)
                drained = False
                continue
            add_numbers(totals, final.get("totals") or {}, "totals")
            drained = drained and bool(final.get("drained"))
        add_numbers(totals, self.retired.totals, "totals")
        for line in stop_lines(totals, drained=drained):
            log.info("%s", line)
        restarts = sum(w.restarts for w in self.workers)
        if restarts:
            log.info("workers restarted %d times; %d flows lost", restarts,
                     sum(w.flows_lost for w in self.workers))  # fmt: skip


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def check_worker_fd(fd: int | None, flag: str) -> int:
    """``fd``, open; a clear error for a hidden flag missing or naming no open fd (a worker
    started by hand?)."""
    if fd is None:
        raise DeviceError(f"{flag} missing (only the supervisor starts workers)")
    try:
        os.fstat(fd)
    except OSError as exc:
        raise DeviceError(f"{flag} {fd}: {os.strerror(exc.errno or errno.EBADF)} "
                          "(only the supervisor starts workers)") from exc  # fmt: skip
    return fd
