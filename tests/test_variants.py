"""A/B variants: stable assignment by weights, lists that name their variant (through a worker
and a real broker), and a prequential evaluation per variant with confidence intervals."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from stream.evaluation import Evaluation
from stream.events import ShopEvent, encode_recommendations
from stream.variants import Variant, assign, parse_variant


def test_parse_variant():
    assert parse_variant("a=models/x") == Variant("a", Path("models/x"), 1.0)
    assert parse_variant("b=models/y:3") == Variant("b", Path("models/y"), 3.0)
    assert parse_variant("c=/tmp/m:odd") == Variant("c", Path("/tmp/m:odd"), 1.0)   # a colon in the path
    for bad in ("nameonly", "=models/x", "a=", "a=models/x:0", "a=models/x:-2"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_assignment_is_stable_and_follows_the_weights():
    variants = [Variant("a", Path("x"), 1.0), Variant("b", Path("y"), 3.0)]
    users = [f"user-{n}" for n in range(20000)]
    first = [assign("exp", u, variants) for u in users]
    assert first == [assign("exp", u, variants) for u in users]          # same on every call / machine
    share_b = Counter(first)[1] / len(users)
    assert 0.73 < share_b < 0.77
    other = [assign("another-exp", u, variants) for u in users]
    assert 0.6 < sum(a == b for a, b in zip(first, other)) / len(users) < 0.7   # independent experiments


def test_evaluation_per_variant_with_confidence_intervals():
    evaluation = Evaluation(k=10)
    for n in range(400):
        user, variant = f"u{n}", "a" if n % 2 else "b"
        items = [{"item_id": f"i{j}", "score": 1.0, "because": None} for j in range(10)]
        evaluation.on_list(encode_recommendations(user, items, "m", "e", 0.0, 0.0, variant))
        # variant a's users buy their first item, b's users something else
        evaluation.score(ShopEvent(f"e{n}", user, "i0" if variant == "a" else "zz", "view", 1.0))
    doc = evaluation.as_dict()
    a, b = doc["variants"]["a"], doc["variants"]["b"]
    assert (a["hr@10"], a["ndcg@10"], a["events"]) == (1.0, 1.0, 200)
    assert (b["hr@10"], b["hr@10_ci95"], b["events"]) == (0.0, 0.0, 200)
    assert doc["hr@10"] == 0.5 and "variant a: HR@10 1.0000" in str(evaluation)
    half = Evaluation(k=10)
    for n in range(100):
        half.on_list(encode_recommendations(f"u{n}", [{"item_id": "i0", "score": 1.0, "because": None}],
                                            "m", "e", 0.0, 0.0, "a"))
        half.score(ShopEvent(f"e{n}", f"u{n}", "i0" if n % 2 else "x", "view", 1.0))
    s = half.by_variant["a"]
    assert s.hr == 0.5 and s.hr_ci == pytest.approx(1.96 * (0.25 / 100) ** 0.5)


@pytest.mark.integration
async def test_a_worker_serves_each_user_its_variant(broker, tiny_model, tiny_shop, tmp_path):
    from stream.replay import replay
    from streamrec import harness

    for name in ("control", "treatment"):
        shutil.copytree(tiny_model, tmp_path / name)
    variants = [Variant("control", tmp_path / "control", 1.0), Variant("treatment", tmp_path / "treatment", 1.0)]
    log_path = tmp_path / "worker.log"
    flags = ["--experiment", "exp-1"] + [arg for v in variants for arg in ("--variant", f"{v.name}={v.model}")]
    refused = harness.start_worker(broker.bootstrap, tiny_model, tmp_path / "state", group="ab", partitions=2,
                                   log_path=tmp_path / "refused.log", extra=flags)
    assert refused.wait(timeout=60) == 2   # --model and --variant together: which one to serve?
    proc = harness.start_worker(broker.bootstrap, None, tmp_path / "state", group="ab", partitions=2,
                                log_path=log_path, extra=flags)
    collector = harness.ListCollector(broker.bootstrap)
    try:
        await harness.wait_for_worker_ready(broker.bootstrap, log_path)
        await collector.start()
        events = [e for e in tiny_shop[0] if int(e["user_id"][-5:]) % 7 == 0][:600]
        log = tmp_path / "events.jsonl"
        log.write_text("".join(json.dumps({"v": 1, **e}) + "\n" for e in events))
        summary = await replay(log, broker.bootstrap, rate=400, evaluate=True, progress=False)
        last = {e["user_id"]: e["event_id"] for e in events}
        assert await collector.wait_for(lambda c: all(c.latest.get(u, {}).get("event_id") == i
                                                      for u, i in last.items()), 90)
        for user in last:
            assert collector.latest[user]["variant"] == variants[assign("exp-1", user, variants)].name
        assert set(summary.evaluation.by_variant) == {"control", "treatment"}
        assert "hr@10_ci95" in summary.as_dict()["evaluation"]["variants"]["control"]
    finally:
        harness.stop_worker(proc)
        await collector.stop()


def test_a_retried_batch_without_what_is_new_is_encoded_in_full(tiny_model):
    """The pipeline's retry passes the users but not their new events: no variant may fail on it."""
    from stream.state import UserState
    from stream.variants import VariantRecommender

    rec = VariantRecommender([Variant("a", tiny_model, 1.0), Variant("b", tiny_model, 1.0)])
    states = [UserState(items=["1", "2"], types=["view", "view"], ts=[1.0, 2.0]) for _ in range(6)]
    result = rec.recommend_batch(states, [], [], [f"u{n}" for n in range(6)])
    assert len(result.lists) == 6 and set(result.variants) <= {"a", "b"}
