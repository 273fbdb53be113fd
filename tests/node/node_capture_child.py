"""Child process for the SIGKILL test: takes offline payments forever, reporting each.

It prints ``approved <payment_id>`` only after take_payment returned approved_offline;
the parent kills it with SIGKILL at an arbitrary moment.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from node_support import make_config, usd, visa

from syncengine.core.policy.acceptance import EntryMethod
from syncengine.core.policy.offline_mode import EntryPolicy, OfflineModePolicy
from syncengine.node import Terminal


async def enroll_nowhere(request: object) -> None:
    return None


async def main(path: str) -> None:
    policy = OfflineModePolicy(entry=EntryPolicy.AUTO, auto_after_ms=1_000)
    # Nothing listens on port 9: a network outage; offline mode is entered automatically.
    terminal = await Terminal.open(
        Path(path),
        make_config(policy=policy),
        "ws://127.0.0.1:9/sync",
        enrollment_code="1",
        enroll=enroll_nowhere,
        tick_interval_ms=20,
        open_timeout_ms=200,
    )
    await terminal.start()
    while terminal.status().mode != "offline":
        await asyncio.sleep(0.02)
    print("ready", flush=True)
    while True:
        result = await terminal.take_payment(usd("1.00"), visa(), EntryMethod.TAP)
        assert result.outcome == "approved_offline", result
        print("approved", result.payment_id, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
