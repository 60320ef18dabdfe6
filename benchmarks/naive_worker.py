"""The naive baseline of ``streamrec bench e2e --compare naive``: a Faust agent that handles
one event at a time -- decode, state (Faust table), encode the whole sequence, search,
rerank, publish -- the way a first streaming recommender is usually written. Same model,
same topics, same state table as the worker, so the benchmark compares like with like.

    python benchmarks/naive_worker.py --broker HOST:PORT --model DIR [--partitions 4] [--data-dir D]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import faust

from stream import compat
from stream.events import EVENTS_TOPIC, RECOMMENDATIONS_TOPIC, InvalidMessage, decode_event, encode_recommendations
from stream.recommender import Recommender
from stream.state import UserState


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", required=True)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--data-dir", type=Path, default=Path(".streamrec-naive"))
    p.add_argument("--group", default="streamrec")
    args, _ = p.parse_known_args()

    import torch

    torch.set_num_threads(1)
    profile = asyncio.run(compat.broker_profile(args.broker))
    compat.patch_faust(profile)
    recommender = Recommender(args.model, cache_bytes=0)   # no incremental cache: full recompute
    app = faust.App(args.group, broker=f"kafka://{args.broker}", store="rocksdb://", datadir=str(args.data_dir),
                    web_enabled=False, topic_partitions=args.partitions, key_serializer="raw",
                    value_serializer="raw", consumer_auto_offset_reset="earliest", **profile.group_settings)
    events = app.topic(EVENTS_TOPIC, partitions=args.partitions, key_serializer="raw", value_serializer="raw")
    table = app.Table("user-state", default=None, partitions=args.partitions, key_type=bytes, value_type=bytes)

    @app.agent(events)
    async def recommend(stream):
        async for event in stream.events():
            try:
                shop_event = decode_event(event.value)
            except InvalidMessage:
                continue
            key = shop_event.user_id.encode()
            state = UserState.decode(table.get(key))
            if state.apply([shop_event]):
                table[key] = state.encode()
            lists, version = recommender.recommend([state])
            await app.producer.send(RECOMMENDATIONS_TOPIC, key, encode_recommendations(
                shop_event.user_id, lists[0], version, state.last_event_id, state.last_event_ts), None, None, None)

    sys.argv = sys.argv[:1]
    faust.Worker(app, loglevel="info", quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    main()
