"""Coalesced: demands for a job made while it runs become one more run, not a task each."""

from __future__ import annotations

import asyncio

from syncengine.server.app import Coalesced


async def test_demands_during_a_run_collapse_into_one_more_run() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    active = 0
    most_at_once = 0

    async def job() -> None:
        nonlocal active, most_at_once
        active += 1
        most_at_once = max(most_at_once, active)
        started.set()
        await release.wait()
        active -= 1

    kick = Coalesced("test job", job)
    kick.kick()
    await started.wait()
    for _ in range(1_000):  # e.g. a thousand outcomes forwarded during one receipt pass
        kick.kick()
    tasks_before = len(asyncio.all_tasks())
    release.set()
    while kick.runs < 2 or active:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    assert kick.runs == 2 and most_at_once == 1
    assert len(asyncio.all_tasks()) < tasks_before  # the run's task ended; none piled up
    kick.kick()  # idle again: a new demand runs at once
    while kick.runs < 3:
        await asyncio.sleep(0.001)
    await kick.stop()


async def test_a_failing_run_is_logged_and_the_next_demand_runs_again() -> None:
    calls = 0

    async def job() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("smtp down")

    kick = Coalesced("test job", job)
    kick.kick()
    while calls < 1:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    kick.kick()
    while calls < 2:
        await asyncio.sleep(0.001)
    await kick.stop()


async def test_stop_cancels_a_run_in_progress() -> None:
    running = asyncio.Event()

    async def job() -> None:
        running.set()
        await asyncio.sleep(3600)

    kick = Coalesced("test job", job)
    kick.kick()
    await running.wait()
    await asyncio.wait_for(kick.stop(), 5)
    await kick.stop()  # twice is harmless
