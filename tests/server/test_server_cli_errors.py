"""``syncengine serve``, ``processor`` and ``run`` refuse a bad start with one clear line.

Real processes: a wrong key file, or a SQLite store another process holds, ends the command
with exit status 1 and the reason on stderr -- no traceback, and nothing overwritten.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from syncengine.server.app import SERVER_KEY_FILE
from syncengine.server.cli import DB_FILE
from syncengine.server.store.sqlite import lock_single_process

START_TIMEOUT_S = 60.0


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncengine.cli", *argv],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )


def _assert_refused(done: subprocess.CompletedProcess[str], command: str, reason: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"syncengine {command}")]
    assert len(lines) == 1 and reason in lines[0], done.stderr


def test_serve_refuses_a_truncated_server_key(tmp_path: Path) -> None:
    key = tmp_path / SERVER_KEY_FILE
    key.write_bytes(b"\x05" * 7)
    done = _run("serve", "--data", str(tmp_path), "--port", "0")
    _assert_refused(done, "serve", f"{key} is 7 bytes, not a 32-byte key")
    assert key.read_bytes() == b"\x05" * 7
    assert "listening" not in done.stdout


def test_serve_refuses_a_sqlite_store_another_process_holds(tmp_path: Path) -> None:
    held = lock_single_process(tmp_path / DB_FILE)
    try:
        done = _run("serve", "--data", str(tmp_path), "--port", "0")
    finally:
        held.close()
    _assert_refused(done, "serve", "is in use by another server process")


def test_processor_refuses_a_truncated_key(tmp_path: Path) -> None:
    key = tmp_path / "processor.key"
    key.write_bytes(b"\x05")
    done = _run("processor", "--data", str(tmp_path), "--port", "0")
    _assert_refused(done, "processor", f"{key} is 1 bytes, not a 32-byte key")
    assert key.read_bytes() == b"\x05"


def test_run_refuses_a_data_directory_another_process_serves(tmp_path: Path) -> None:
    # `make run` twice on one --data: the second says so and leaves the first alone.
    (tmp_path / "server").mkdir()
    held = lock_single_process(tmp_path / "server" / DB_FILE)
    try:
        done = _run("run", "--data", str(tmp_path), "--port", "0", "--processor-port", "0")
    finally:
        held.close()
    _assert_refused(done, "run", "is in use by another server process")
    assert "is running on loopback" not in done.stdout
