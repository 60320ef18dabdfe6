"""Shared fixtures: a fresh embedded broker per test module (Tansu memory storage never frees)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stream.broker import EmbeddedBroker

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=str(log_path)) as b:
        yield b


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA
