"""The online-first gate between the worker's online and replay agents."""

from __future__ import annotations

import asyncio
import time

from graphinfer.streams.priority import OnlineFirst


async def test_replay_batch_whole_without_online() -> None:
    gate = OnlineFirst()
    assert list(gate.replay_steps(list(range(16)))) == [list(range(16))]


async def test_replay_batch_split_after_online() -> None:
    gate = OnlineFirst(busy_step=2)
    async with gate.online_batch():
        pass
    steps = list(gate.replay_steps(list(range(5))))
    assert steps == [[0, 1], [2, 3], [4]]


async def test_replay_steps_grow_to_the_time_target() -> None:
    gate = OnlineFirst(busy_step=2, step_target_s=0.05)
    async with gate.online_batch():
        pass
    # A step of 2 requests took 20 ms: 10 ms each, so the next step takes 5.
    first = next(iter(gate.replay_steps(list(range(64)))))
    assert len(first) == 2
    async with gate.replay_step(len(first)):
        await asyncio.sleep(0.02)
    assert gate.seconds_per_request is not None
    assert 0.009 <= gate.seconds_per_request < 0.02
    assert 3 <= gate.busy_step_size() <= 5


async def test_replay_steps_never_below_busy_step() -> None:
    gate = OnlineFirst(busy_step=2, step_target_s=0.05)
    async with gate.online_batch():
        pass
    async with gate.replay_step(1):
        await asyncio.sleep(0.1)
    assert gate.busy_step_size() == 2


async def test_replay_step_waits_for_online_batch() -> None:
    gate = OnlineFirst(max_wait_s=5.0)
    release = asyncio.Event()
    order: list[str] = []

    async def online() -> None:
        async with gate.online_batch():
            await release.wait()
            order.append("online done")

    async def replay() -> None:
        async with gate.replay_step():
            order.append("replay started")

    online_task = asyncio.create_task(online())
    await asyncio.sleep(0)
    replay_task = asyncio.create_task(replay())
    await asyncio.sleep(0.05)
    assert order == [], "the replay step waits while the online batch runs"
    release.set()
    await asyncio.gather(online_task, replay_task)
    assert order == ["online done", "replay started"]


async def test_replay_step_waits_at_most_max_wait() -> None:
    gate = OnlineFirst(max_wait_s=0.1)
    release = asyncio.Event()
    online_task = asyncio.create_task(_hold(gate, release))
    await asyncio.sleep(0)
    started = time.monotonic()
    async with gate.replay_step():
        waited = time.monotonic() - started
    release.set()
    await online_task
    assert 0.09 <= waited < 1.0, "continuous online load slows the replay but does not stop it"


async def test_replay_step_pauses_for_share() -> None:
    gate = OnlineFirst(replay_share=0.25, max_wait_s=1.0)
    async with gate.online_batch():
        pass
    started = time.monotonic()
    async with gate.replay_step():
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    assert elapsed >= 0.05 + 0.15 * 0.9, "a step of 50 ms is followed by a 150 ms pause at a 0.25 share"


async def _hold(gate: OnlineFirst, release: asyncio.Event) -> None:
    async with gate.online_batch():
        await release.wait()
