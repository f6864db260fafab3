"""CPU time and memory of a gateway that may be several processes, from /proc.

Why a process tree: a gateway is not always one process. ``tunlwip up --workers 2`` is a
supervisor and its workers, hev-socks5-tunnel needs danted (which forks a process per batch
of clients), slirp4netns and pasta are one. Every figure is therefore the sum over the roots
the method names and all their descendants, found through the ``ppid`` field of
``/proc/<pid>/stat`` at the moment of reading.

CPU time is utime + stime, plus cutime + cstime (the CPU of children that have exited and
been waited for), of every process of the tree: a danted child that exits during a phase is
still counted, through its parent. Resolution is the clock tick (10 ms on most kernels), so
a figure per operation is only as good as the number of ticks the phase spent.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields 3 onwards of /proc/<pid>/stat (after the parenthesised command name)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc/<pid>/stat."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat(5)


def descendants(roots: Iterable[int]) -> list[int]:
    """``roots`` and every living process below them (roots that have gone are left out)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(_stat_fields(int(entry.name))[1])  # field 4 of stat(5)
            children.setdefault(ppid, []).append(int(entry.name))
    seen: list[int] = []
    todo = [pid for pid in roots if Path(f"/proc/{pid}").exists()]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(children.get(pid, []))
    return seen


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """CPU seconds of the whole tree below ``roots``: each process's own time and that of its
    children already reaped (fields 14-17 of stat(5))."""
    total = 0
    for pid in descendants(roots):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = _stat_fields(pid)
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} for {pid}")


def rss_kib(pid: int) -> int:
    """VmRSS of one process."""
    return _status_kib(pid, "VmRSS")


def tree_rss_kib(roots: Iterable[int]) -> int:
    """The sum of VmRSS over the tree. For a single process that is its RSS; for several it
    counts pages they share (libraries, a forked parent's heap) once per process, so it
    overstates: tree_pss_kib divides shared pages among their users instead."""
    total = 0
    for pid in descendants(roots):
        with contextlib.suppress(OSError, RuntimeError):
            total += rss_kib(pid)
    return total


def tree_pss_kib(roots: Iterable[int]) -> int | None:
    """The sum of Pss (/proc/<pid>/smaps_rollup) over the tree, None where the kernel has no
    smaps_rollup (before 4.14)."""
    total = 0
    for pid in descendants(roots):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except FileNotFoundError:
            if not Path(f"/proc/{pid}").exists():
                continue  # exited while we looked
            return None
        except OSError:
            continue
    return total


def pss_by_root(roots: Iterable[int]) -> dict[str, int | None]:
    """Each root's tree's PSS (KiB) under the root's command name: which part of a
    multi-process gateway (hev-socks5-tunnel or danted, say) the memory is in."""
    out: dict[str, int | None] = {}
    for pid in roots:
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            out[f"{name}[{pid}]"] = tree_pss_kib([pid])
    return out
