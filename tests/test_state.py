"""Per-user state: bounded, ordered, idempotent by event id; coalescing keeps arrival order."""

from stream.events import ShopEvent
from stream.state import MAX_EVENT_IDS, UserState, coalesce_by_user


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
    assert len(s.event_ids) <= MAX_EVENT_IDS


def test_encode_decode_round_trip():
    s = UserState()
    s.apply([ev(1), ev(2, kind="purchase")])
    assert UserState.decode(s.encode()) == s
    assert UserState.decode(None) == UserState()


def test_coalesce_groups_by_user_in_arrival_order():
    pairs = [(ev(1, "a"), 0), (ev(2, "b"), 1), (ev(3, "a"), 2)]
    grouped = coalesce_by_user(pairs)
    assert list(grouped) == ["a", "b"]
    assert [e.event_id for e, _ in grouped["a"]] == ["e1", "e3"]
