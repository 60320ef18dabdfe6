"""The worker's threads as the OS shows them: named, so that ``top -H``, ``py-spy`` and /proc
tell the recommend stage's CPU apart from the event loop's (``streamrec bench e2e`` counts it
per phase). Python names its threads, but the OS thread keeps the process's name unless told."""

from __future__ import annotations

import ctypes
import sys

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
