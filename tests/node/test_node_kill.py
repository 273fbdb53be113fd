"""SIGKILL a real capturing process: every reported payment survives, none is half-written."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from node_support import make_config

from syncengine.core.errors import InvalidState
from syncengine.node import Terminal
from syncengine.node.machine import TerminalMachine
from syncengine.node.store import Store

HERE = Path(__file__).parent
KILL_AFTER_APPROVALS = 40
CHILD_TIMEOUT_S = 30


def _capturing_child(db: Path) -> subprocess.Popen[str]:
    """A process taking offline payments into ``db`` for ever, printing each approval."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, str(HERE / "node_capture_child.py"), str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )


def test_sigkill_keeps_every_reported_payment(tmp_path: Path) -> None:
    db = tmp_path / "kill.db"
    child = _capturing_child(db)
    approved: list[str] = []
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        assert child.stdout is not None
        while len(approved) < KILL_AFTER_APPROVALS:
            assert time.monotonic() < deadline, "child too slow"
            line = child.stdout.readline()
            assert line, f"child died: {child.stderr.read() if child.stderr else ''}"
            if line.startswith("approved "):
                approved.append(line.split()[1])
        # Kill mid-stream: the child is in the middle of its next capture.
        os.kill(child.pid, signal.SIGKILL)
        rest = child.stdout.read()  # anything printed before the kill landed also counts
        approved += [ln.split()[1] for ln in rest.splitlines() if ln.startswith("approved ")]
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    store = Store(db)
    ops = store.load_ops()  # every row matches its digest
    machine = TerminalMachine.restore(
        make_config(), bytes(32), lambda n: 0, 0, ops, 0, store.get_meta("offline_mode") or ""
    )  # every chain links up: no half-written op
    store.close()
    stored = [v.payment_id for v in machine.history()]
    assert set(approved) <= set(stored)
    # At most the one capture in flight at the kill was stored without being reported.
    assert len(stored) - len(approved) <= 1
    assert stored[: len(approved)] == approved


def test_a_database_in_use_by_a_process_opens_only_once_that_process_is_gone(
    tmp_path: Path,
) -> None:
    # Two Terminals on one database would number the next payment alike; the second to
    # store it would then fail every payment after that. While a capturing process has
    # the database open, another process's open is refused; its death frees it.
    db = tmp_path / "busy.db"
    child = _capturing_child(db)
    approved: list[str] = []
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        assert child.stdout is not None
        while len(approved) < 3:
            assert time.monotonic() < deadline, "child too slow"
            line = child.stdout.readline()
            assert line, f"child died: {child.stderr.read() if child.stderr else ''}"
            if line.startswith("approved "):
                approved.append(line.split()[1])
        with pytest.raises(InvalidState, match="is already open"):
            asyncio.run(Terminal.open(db, make_config(), "ws://127.0.0.1:9/sync"))
        assert child.poll() is None  # the capturing process was left alone
        os.kill(child.pid, signal.SIGKILL)
        rest = child.stdout.read()
        approved += [ln.split()[1] for ln in rest.splitlines() if ln.startswith("approved ")]
    finally:
        child.kill()
        child.wait()

    async def reopen() -> list[str]:
        terminal = await Terminal.open(db, make_config(), "ws://127.0.0.1:9/sync")
        try:
            return [view.payment_id for view in terminal.history()]
        finally:
            await terminal.close()

    assert set(approved) <= set(asyncio.run(reopen()))
