"""Per-user state: bounded, ordered, idempotent by event id; read and written a batch at a time."""

import msgpack

from stream.events import ShopEvent
from stream.state import MAX_EVENT_IDS, UserState, event_digest


def ev(i, user="u", item=None, kind="view"):
    return ShopEvent(f"e{i}", user, item or f"i{i}", kind, float(i))


def test_apply_appends_in_order_and_tracks_last_event():
    s = UserState()
    assert s.apply([ev(1), ev(2, kind="purchase"), ev(3)]) == 3
    assert s.items == ["i1", "i2", "i3"] and s.types == ["view", "purchase", "view"]
    assert s.purchased == ["i2"]
    assert (s.last_event_id, s.last_event_ts) == ("e3", 3.0)
    assert s.history() == [("i1", "view", 1.0), ("i2", "purchase", 2.0), ("i3", "view", 3.0)]


def test_duplicate_event_ids_are_applied_once():
    s = UserState()
    s.apply([ev(1), ev(2)])
    assert s.apply([ev(1), ev(2)]) == 0
    assert s.apply([ev(2), ev(3)]) == 1
    assert s.items == ["i1", "i2", "i3"]


def test_history_is_bounded_but_purchases_outlive_it():
    s = UserState()
    s.apply([ev(0, item="bought", kind="purchase")] + [ev(i) for i in range(1, 120)], max_events=50)
    assert len(s.items) == 50 and s.items[-1] == "i119"
    assert "bought" in s.purchased
    assert len(s.seen) <= MAX_EVENT_IDS


def test_encode_decode_round_trip():
    s = UserState()
    s.apply([ev(1), ev(2, kind="purchase")])
    assert UserState.decode(s.encode()) == s
    assert UserState.decode(None) == UserState()


def test_state_written_by_the_previous_version_still_reads():
    v1 = msgpack.packb({"v": 1, "items": ["i1"], "types": ["view"], "ts": [1.0], "purchased": [],
                        "event_ids": ["e1"], "last_event_id": "e1", "last_event_ts": 1.0})
    s = UserState.decode(v1)
    assert s.seen == [event_digest("e1")] and s.apply([ev(1)]) == 0 and s.apply([ev(2)]) == 1


class _MemoryStore:   # what StateTable reads of Faust's memory store
    def __init__(self):
        self.data, self._key_partition, self.offsets = {}, {}, {}

    def set_persisted_offset(self, tp, offset):
        self.offsets[tp.partition] = offset


class _Table:
    def __init__(self):
        self.data = _MemoryStore()
        self.changelog_topic = type("T", (), {"get_topic_name": lambda self: "changelog"})()


def test_state_table_stages_until_durable_then_persists_and_deletes():
    from stream.state import StateTable

    table = StateTable(_Table())
    table.stage(1, 0, b"a", b"A1")
    table.stage(2, 1, b"b", b"B2")
    assert table.get_many(0, [b"a", b"zz"]) == [b"A1", None] and table.store.data == {}
    assert table.persist(1, {0: 7}) == 1            # batch 1 is durable, batch 2 not yet
    assert table.store.data == {b"a": b"A1"} and table.store.offsets == {0: 7} and table.staged == 1
    table.stage(3, 0, b"a", None)                    # erased: a staged deletion reads as missing
    assert table.get_many(0, [b"a"]) == [None]
    table.persist(3, {})
    assert table.store.data == {b"b": b"B2"} and b"a" not in table.store._key_partition


def test_state_table_scan_walks_the_partitions_in_bounded_steps():
    from stream.state import StateTable

    table = StateTable(_Table())
    for n in range(5):
        table.stage(1, n % 2, f"k{n}".encode(), f"v{n}".encode())
    table.persist(1, {})
    seen = [key for _ in range(3) for _, key, _ in table.scan({0, 1}, 2)]
    assert sorted(seen[:5]) == [b"k0", b"k1", b"k2", b"k3", b"k4"]   # every row, 2 at a time
    assert table.scan(set(), 2) == []
