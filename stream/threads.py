"""The worker's threads as the OS shows them: named, so that ``top -H``, ``py-spy`` and /proc
tell the recommend stage's CPU apart from the event loop's (``streamrec bench e2e`` counts it
per phase). Python names its threads, but the OS thread keeps the process's name unless told.
By name, the kernel's count of how long the stage waited for a core (its run-queue delay) can
be read too: on a machine whose cores other processes (or a CPU limit) take, the stage's batches
wait for a core besides their own work, and latency includes that (docs/performance.md)."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

RECOMMEND_THREAD = "recommend"          # the pipeline's recommend thread (recommend_0)
LANE_THREAD = "lane"                    # the recommender's helpers for its other lanes (lane_0, ...)
STAGE_THREADS = (RECOMMEND_THREAD, LANE_THREAD)   # the recommend stage's threads, by name prefix
PR_SET_NAME = 15                        # prctl's option that names the calling thread


def name_os_thread(name: str) -> None:
    """The calling thread's name as the OS shows it (Linux: 15 bytes at most; elsewhere nothing)."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def run_queue_seconds(task: Path) -> float:
    """Seconds a thread (``task``: its /proc/PID/task/TID directory) was ready to run but waited
    for a core: the kernel's run-queue delay, schedstat's second field. nan where it cannot be
    read (the thread ended, a kernel without scheduler statistics, not Linux)."""
    try:
        return int((task / "schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def stage_cpu_wait_seconds(pid: int | str = "self", prefixes: tuple[str, ...] = STAGE_THREADS,
                           proc: Path = Path("/proc")) -> float:
    """The run-queue delay of a process's threads whose OS name starts with one of ``prefixes``
    (default: the recommend stage's), summed: how long the stage waited for a core, where
    ``streamrec_recommend_busy_seconds`` counts how long it took. 0 with no such thread yet;
    nan where /proc cannot tell (not Linux)."""
    total, readable = 0.0, False
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return float("nan")
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
        except OSError:   # the thread has ended meanwhile
            continue
        readable = True
        if name.startswith(prefixes):
            waited = run_queue_seconds(task)
            if waited == waited:
                total += waited
    return total if readable else float("nan")
