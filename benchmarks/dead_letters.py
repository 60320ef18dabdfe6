"""What a malformed message costs the event loop against a good one: decode, validate and
(for a bad one) build its dead letter, as ``stream/pipeline.py``'s prepare stage does.

    python benchmarks/dead_letters.py

The malformed messages are the chaos benchmark's (a fixed corpus of 20+ kinds and a mutation
fuzzer, ``streamrec/chaos.py``); only those the contract refuses are timed.
"""

from __future__ import annotations

import argparse
import random
import time

from stream.events import InvalidMessage, decode_keyed_event, encode_dead_letter, encode_event
from streamrec.chaos import expected_outcome, fuzzed, good_events, malformed_corpus


def per_message_us(records: list[tuple[bytes | None, bytes | None]]) -> tuple[float, int]:
    started, dead = time.perf_counter(), 0
    for key, value in records:
        try:
            decode_keyed_event(key, value)
        except InvalidMessage as exc:
            encode_dead_letter(value, exc.reason, "shop-events", 0, 0, key)
            dead += 1
    return (time.perf_counter() - started) / len(records) * 1e6, dead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    rng = random.Random(0)
    good = good_events(args.messages, 0)
    good_records = [(e["user_id"].encode(), encode_event(e)) for e in good]
    bad: list[tuple[bytes | None, bytes | None]] = []
    while len(bad) < args.messages:
        event = rng.choice(good)
        bad.extend((k, v) for _, k, v in malformed_corpus(rng, event))
        bad.extend((k, v) for _, k, v in (fuzzed(rng, event) for _ in range(30)))
    bad = [(k, v) for k, v in bad if expected_outcome(k, v) is not None][: args.messages]
    for name, records in (("good", good_records), ("malformed", bad)):
        per_message_us(records)   # warm up
        us, dead = per_message_us(records)
        print(f"{name:>9}: {len(records):,} messages, {us:.1f} µs/message, {dead:,} dead letters")


if __name__ == "__main__":
    main()
