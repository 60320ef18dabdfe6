"""The worker's threads as the OS shows them: named, so that ``top -H``, ``py-spy`` and /proc
tell the recommend stage's CPU apart from the event loop's (``streamrec bench e2e`` counts it
per phase). Python names its threads, but the OS thread keeps the process's name unless told.
By name, the kernel's count of how long the stage waited for a core (its run-queue delay) can
be read too, and the event loop's (the main thread's): on a machine whose cores other processes
(or a CPU limit) take, batches wait for a core besides their own work, and latency includes
that (docs/performance.md)."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Iterable

RECOMMEND_THREAD = "recommend"          # the pipeline's recommend thread (recommend_0)
LANE_THREAD = "lane"                    # the recommender's helpers for its other lanes (lane_0, ...)
STAGE_THREADS = (RECOMMEND_THREAD, LANE_THREAD)   # the recommend stage's threads, by name prefix
EVENT_LOOP = "event_loop"               # the process's main thread, which runs the worker's event loop
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


def wait_by_role(threads: Iterable[tuple[Path, str]], main: str) -> dict[str, float]:
    """The run-queue delay of a process's ``threads`` ((its /proc/PID/task/TID directory, its OS
    name) each) by role: ``recommend``, the threads named as the recommend stage's
    (STAGE_THREADS), summed over those that can be read (0 with none), and ``event_loop``, the
    main thread (TID ``main``; absent if not among them, nan if unreadable)."""
    waits = {RECOMMEND_THREAD: 0.0}
    for task, name in threads:
        if task.name == main:
            waits[EVENT_LOOP] = run_queue_seconds(task)
        elif name.startswith(STAGE_THREADS):
            waited = run_queue_seconds(task)
            if waited == waited:
                waits[RECOMMEND_THREAD] += waited
    return waits


def cpu_wait_seconds(pid: int | str = "self", proc: Path = Path("/proc")) -> dict[str, float]:
    """How long a worker's threads waited for a core (their run-queue delay), by role
    (`wait_by_role`): the recommend stage's threads and the event loop, the process's main
    thread. ``streamrec_recommend_busy_seconds`` counts how long the stage's batches took; this,
    how long they and the event loop were held back by other work. A thread that has ended takes
    its count with it (the stage's threads live as long as the worker). {} where /proc cannot
    tell (not Linux)."""
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return {}
    named = []
    for task in tasks:
        try:
            named.append((task, (task / "comm").read_text().strip()))
        except OSError:   # the thread has ended meanwhile
            continue
    waits = wait_by_role(named, str(os.getpid()) if pid == "self" else str(pid))
    return {role: seconds for role, seconds in waits.items() if seconds == seconds} if EVENT_LOOP in waits else {}
