"""``syncengine serve``, ``processor`` and ``run`` refuse a bad start with one clear line.

Real processes: a wrong key file, or a SQLite store another process holds, ends the command
with exit status 1 and the reason on stderr -- no traceback, and nothing overwritten.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncengine.server.cli import DB_FILE, SERVER_KEY_FILE
from syncengine.server.store.sqlite import lock_single_process

START_TIMEOUT_S = 60.0
RUN = [sys.executable, "-m", "syncengine.cli", "run"]


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


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["serve", "--port", "65536"], "a port is 0 to 65535, not 65536"),
        (["serve", "--port", "-1"], "a port is 0 to 65535, not -1"),
        (["serve", "--log-level", "bogus"], "'bogus' is not one of debug, info"),
        (["serve", "--smtp", "localhost"], "'localhost' is not HOST:PORT"),
        (["serve", "--smtp", "localhost:abc"], "'abc' is not a whole number"),
        (["serve", "--smtp", "host:99999"], "a port is 1 to 65535"),
        (["serve", "--currency", "XYZ"], "'XYZ' is not a known currency code"),
        (["serve", "--processor", "127.0.0.1:8081"], "is not an http:// or https:// URL"),
        (["serve", "--processor", "http://"], "is not an http:// or https:// URL"),
        (["serve", "--merchant-id="], "'' is not a merchant id"),
        (["serve", "--forward-lease-ms", "0"], "must be at least 1, not 0"),
        (["serve", "--lookup-first-after-ms", "-5"], "must be 0 or more, not -5"),
        (["processor", "--port", "70000"], "a port is 0 to 65535, not 70000"),
        (["run", "--processor-port", "65536"], "a port is 0 to 65535, not 65536"),
    ],
)
def test_a_bad_option_is_a_usage_error_before_anything_starts(
    tmp_path: Path, argv: list[str], reason: str
) -> None:
    done = _run(*argv, "--data", str(tmp_path / "data"))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and reason in done.stderr, done.stderr
    assert not (tmp_path / "data").exists()  # nothing was created


def test_an_unusable_data_directory_or_database_is_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    for command in ("serve", "processor", "run"):
        done = _run(command, "--data", str(a_file), "--port", "0")
        _assert_refused(done, command, f"cannot use --data {a_file}")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / DB_FILE).write_bytes(b"these are not the pages you are looking for" * 100)
    done = _run("serve", "--data", str(garbage), "--port", "0")
    _assert_refused(done, "serve", f"cannot open the store {garbage / DB_FILE}")
    (garbage / "ledger.sqlite3").write_bytes(b"nor these" * 100)
    done = _run("processor", "--data", str(garbage), "--port", "0")
    _assert_refused(done, "processor", "cannot open the sandbox ledger")


def test_a_host_that_is_not_this_machines_names_the_host(tmp_path: Path) -> None:
    done = _run("serve", "--data", str(tmp_path), "--host", "nonexistent.invalid", "--port", "0")
    _assert_refused(done, "serve", "check --host")


def test_run_refuses_one_port_for_both_services(tmp_path: Path) -> None:
    done = _run("run", "--data", str(tmp_path), "--port", "18600", "--processor-port", "18600")
    assert done.returncode == 2 and "--port and --processor-port must differ" in done.stderr


def test_run_without_its_owner_key_file_says_how_to_make_one(tmp_path: Path) -> None:
    # The key is shown once: an earlier start made it, and its file was since removed.
    for start in range(2):
        proc = subprocess.Popen(
            [*RUN, "--data", str(tmp_path), "--port", "0", "--processor-port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            lines: list[str] = []
            deadline = time.monotonic() + START_TIMEOUT_S
            while not any("Press Ctrl-C to stop." in line for line in lines):
                assert time.monotonic() < deadline, lines
                line = proc.stdout.readline()
                assert line, proc.stderr.read() if proc.stderr else ""
                lines.append(line)
        finally:
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=START_TIMEOUT_S)
        text = "".join(lines)
        if start == 0:
            assert "Owner API key: sk_" in text
            (tmp_path / "server" / "owner-api-key.txt").unlink()
        else:
            assert "Owner API key: $OWNER_KEY" in text
            assert "make a new one with: syncengine owner-key" in err
            assert "Traceback" not in err
