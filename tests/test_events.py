"""The wire contract: what is a valid v1 event, and why each bad one is rejected."""

import msgpack
import pytest

from stream.events import (InvalidMessage, ShopEvent, decode_dead_letter, decode_event, decode_item,
                           decode_recommendations, encode_dead_letter, encode_event, encode_item,
                           encode_recommendations)

GOOD = {"v": 1, "event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "view", "ts": 1.5}


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_round_trip_and_extra_keys_ignored():
    event = decode_event(pack({**GOOD, "session": "s9", "price": 3}))
    assert event == ShopEvent("e1", "u1", "i1", "view", 1.5)
    assert decode_event(encode_event(event)) == event


def test_integer_ts_is_accepted_as_float():
    assert decode_event(pack({**GOOD, "ts": 7})).ts == 7.0


@pytest.mark.parametrize("value, reason", [
    (None, "empty value"),
    (b"", "empty value"),
    (b"\xc1\xff\x00garbage", "not msgpack"),
    (pack([1, 2, 3]), "not a map"),
    (pack("just a string"), "not a map"),
    (pack({**GOOD, "v": 2}), "unsupported v"),
    (pack({k: v for k, v in GOOD.items() if k != "v"}), "unsupported v"),
    (pack({**GOOD, "v": True}), "unsupported v"),
    (pack({k: v for k, v in GOOD.items() if k != "user_id"}), "missing user_id"),
    (pack({**GOOD, "user_id": ""}), "empty user_id"),
    (pack({**GOOD, "user_id": 42}), "user_id must be a string"),
    (pack({k: v for k, v in GOOD.items() if k != "item_id"}), "missing item_id"),
    (pack({**GOOD, "item_id": ""}), "empty item_id"),
    (pack({**GOOD, "item_id": ["x"]}), "item_id must be a string"),
    (pack({**GOOD, "event_id": None}), "missing event_id"),
    (pack({**GOOD, "type": "wishlist"}), "unknown type"),
    (pack({**GOOD, "type": 3}), "type must be a string"),
    (pack({**GOOD, "ts": "yesterday"}), "ts must be a number"),
    (pack({**GOOD, "ts": float("nan")}), "invalid ts"),
    (pack({**GOOD, "ts": -1}), "invalid ts"),
    (pack({**GOOD, "ts": float("inf")}), "invalid ts"),
    (pack({**GOOD, "user_id": "u" * 200_000}), "user_id longer than 256"),
    (pack({**GOOD, "item_id": "i" * 257}), "item_id longer than 256"),
    (pack({k: v for k, v in GOOD.items() if k != "event_id"} | {"type": "delete_user"}), "missing event_id"),
])
def test_rejects_with_reason(value, reason):
    with pytest.raises(InvalidMessage) as err:
        decode_event(value)
    assert err.value.reason.startswith(reason)


def test_delete_user_needs_no_item_and_round_trips():
    from stream.events import DELETE_USER, delete_user_event, encode_event

    msg = {k: v for k, v in GOOD.items() if k != "item_id"} | {"type": "delete_user"}
    event = decode_event(pack(msg))
    assert (event.type, event.item_id, event.user_id) == (DELETE_USER, "", GOOD["user_id"])
    again = decode_event(encode_event(delete_user_event("u9", "e9", 5.0)))
    assert (again.type, again.user_id, again.event_id, again.ts) == (DELETE_USER, "u9", "e9", 5.0)
    assert b"item_id" not in encode_event(delete_user_event("u9", "e9", 5.0))


def test_dead_letter_keeps_original_bytes_and_source():
    raw = b"\x00not an event"
    record = decode_dead_letter(encode_dead_letter(raw, "not msgpack", "shop-events", 3, 17, b"u1"))
    assert record["value"] == raw and record["key"] == b"u1"
    assert (record["reason"], record["topic"], record["partition"], record["offset"]) == (
        "not msgpack", "shop-events", 3, 17)


def test_recommendations_round_trip():
    items = [{"item_id": "a", "score": 0.5}, {"item_id": "b", "score": 0.25}]
    msg = decode_recommendations(encode_recommendations("u1", items, "v7", "e9", 10.0, 11.0))
    assert msg == {"v": 1, "user_id": "u1", "items": items, "model_version": "v7", "event_id": "e9",
                   "event_ts": 10.0, "produced_ts": 11.0}


def test_catalogue_messages():
    item = decode_item(b"sku-1", encode_item("sku-1", in_stock=False, attributes=["brand:x"], boost=2))
    assert (item.item_id, item.in_stock, item.attributes, item.boost, item.removed) == (
        "sku-1", False, ("brand:x",), 2.0, False)
    assert decode_item(b"sku-1", None).removed
    with pytest.raises(InvalidMessage):
        decode_item(None, None)
    with pytest.raises(InvalidMessage, match="in_stock"):
        decode_item(b"k", pack({"v": 1, "item_id": "k", "in_stock": "yes"}))
    with pytest.raises(InvalidMessage, match="attributes"):
        decode_item(b"k", pack({"v": 1, "item_id": "k", "attributes": "brand:x"}))
