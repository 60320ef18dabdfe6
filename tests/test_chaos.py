"""The chaos benchmark's scenarios at a small scale, as tests on both brokers: after each fault
every acknowledged event has its list, none is in a user's state twice, every malformed
message is a dead letter, and no worker died on its own."""

from __future__ import annotations

import asyncio

import pytest

from stream.state import MAX_EVENT_IDS, MAX_EVENTS, MAX_PURCHASED, UserState
from stream.events import ShopEvent
from streamrec.chaos import ChaosOptions, Row, _scenario, good_events

pytestmark = pytest.mark.integration


def run(scenario: str, broker, tiny_model, tmp_path, **kw) -> Row:
    options = ChaosOptions(broker_kind=broker.kind, scenarios=[scenario], model=tiny_model, **kw)
    good = good_events(options.events, 0)
    row = Row(scenario, broker.kind)
    asyncio.run(_scenario(row, broker, tiny_model, good, options, tmp_path))
    return row


@pytest.mark.parametrize("scenario, kw", [
    ("malformed", dict(events=1500, rate=1500, malformed=1500)),
    ("rebalance", dict(events=2000, rate=500)),
    ("model-corrupt", dict(events=1500, rate=400)),
    ("catalogue-flood", dict(events=1500, rate=500, catalogue_updates=20_000)),
])
def test_scenario_loses_nothing(scenario, kw, fresh_broker, tiny_model, tmp_path):
    row = run(scenario, fresh_broker, tiny_model, tmp_path, **kw)
    assert row.offered and row.users
    assert row.ok, row.as_dict()
    if scenario == "malformed":
        kinds = set(row.dead_expected)
        assert len(kinds) >= 20, kinds   # the fixed corpus and the fuzzer
        assert row.dead_got == row.dead_expected


def test_state_stays_bounded_whatever_the_input():
    state = UserState()
    events = [ShopEvent(f"e{n}", "u", f"i{n % 700}", "purchase" if n % 3 else "view", float(n)) for n in range(5000)]
    state.apply(events)
    assert len(state.items) == MAX_EVENTS and len(state.purchased) == MAX_PURCHASED
    assert len(state.seen) == MAX_EVENT_IDS
    assert len(state.encode()) < 64 * 1024   # ids are at most 256 characters (stream/events.py)
