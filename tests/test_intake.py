"""Record intake: how long a partial batch waits (natural batching) and what a take returns."""

import asyncio
import time

from stream.intake import RecordIntake

WITHIN = 0.5   # far above scheduling noise: a take that returns early did not wait it out


def filled(n: int) -> RecordIntake:
    intake = RecordIntake({"t"}, max_buffered=100)
    intake.offer("tp", list(range(n)))
    return intake


def idle_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


async def timed_take(intake: RecordIntake, max_records: int, ready=None):
    started = time.monotonic()
    chunks = await intake.take(max_records, WITHIN, ready=ready)
    return [r for _, records in chunks for r in records], time.monotonic() - started


async def test_a_partial_batch_waits_for_more_while_the_recommender_is_busy():
    busy = asyncio.Event()
    records, waited = await timed_take(filled(3), 10, ready=busy)
    assert records == [0, 1, 2] and waited >= WITHIN * 0.9


async def test_a_partial_batch_goes_at_once_when_the_recommender_is_idle():
    records, waited = await timed_take(filled(3), 10, ready=idle_event())
    assert records == [0, 1, 2] and waited < WITHIN / 2


async def test_the_wait_ends_when_the_recommender_becomes_idle_and_keeps_what_arrived():
    intake, ready = filled(3), asyncio.Event()

    async def later():
        await asyncio.sleep(0.05)
        intake.offer("tp", [3, 4])
        await asyncio.sleep(0.05)
        ready.set()

    task = asyncio.create_task(later())
    records, waited = await timed_take(intake, 10, ready=ready)
    await task
    assert records == [0, 1, 2, 3, 4] and 0.09 <= waited < WITHIN / 2


async def test_a_full_batch_goes_at_once_and_the_rest_stays_first_in_line():
    intake = filled(15)
    records, waited = await timed_take(intake, 10, ready=asyncio.Event())
    assert records == list(range(10)) and waited < WITHIN / 2
    assert intake.buffered == 5
    rest, _ = await timed_take(intake, 10, ready=idle_event())
    assert rest == list(range(10, 15))


async def test_a_take_says_how_long_its_oldest_records_waited():
    intake = filled(3)
    await asyncio.sleep(0.1)
    intake.offer("tp", [3])   # newer: the wait is the oldest chunk's
    records, _ = await timed_take(intake, 10, ready=idle_event())
    assert records == [0, 1, 2, 3] and 0.09 <= intake.waited < WITHIN
    intake.offer("tp", [4, 5])
    await timed_take(intake, 10, ready=idle_event())
    assert intake.waited < 0.09   # only what this take took counts
