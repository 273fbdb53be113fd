"""Processes starting together on one data dir agree on one key, written once."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from syncengine.core.crypto import KEY_BYTES
from syncengine.core.errors import StorageError
from syncengine.files import load_or_create_key_file
from syncengine.processor.service import KEY_FILE as PROCESSOR_KEY_FILE
from syncengine.processor.service import load_or_create_key
from syncengine.server.app import load_or_create_server_key
from syncengine.server.cli import SERVER_KEY_FILE


def test_concurrent_first_starts_share_one_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(lambda _: load_or_create_server_key(data).public, range(32)))
    assert len(set(keys)) == 1
    path = data / SERVER_KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in data.iterdir()) == [SERVER_KEY_FILE]  # no temp files left
    assert load_or_create_server_key(data).public == keys[0]  # stable across restarts


def test_processor_first_starts_share_one_key(tmp_path: Path) -> None:
    data = tmp_path / "processor"
    data.mkdir()
    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(lambda _: load_or_create_key(data), range(32)))
    assert len(set(keys)) == 1 and len(keys[0]) == KEY_BYTES
    assert stat.S_IMODE(os.stat(data / PROCESSOR_KEY_FILE).st_mode) == 0o600
    assert sorted(p.name for p in data.iterdir()) == [PROCESSOR_KEY_FILE]
    assert load_or_create_key(data, make_key=lambda: b"\x01" * KEY_BYTES) == keys[0]


@pytest.mark.parametrize("size", [0, KEY_BYTES - 1, KEY_BYTES + 1])
def test_a_key_file_of_the_wrong_size_is_refused_and_kept(tmp_path: Path, size: int) -> None:
    # An emptied or truncated key (a full disk, a bad copy) is never replaced by a new
    # one: everything enrolled or sealed with the old key would stop matching.
    path = tmp_path / SERVER_KEY_FILE
    path.write_bytes(b"\x07" * size)
    with pytest.raises(StorageError, match=rf"{SERVER_KEY_FILE} is {size} bytes"):
        load_or_create_server_key(tmp_path)
    assert path.read_bytes() == b"\x07" * size


def test_a_new_key_of_the_wrong_size_is_never_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be 32 bytes"):
        load_or_create_key_file(tmp_path / "k", KEY_BYTES, lambda: b"short")
    assert list(tmp_path.iterdir()) == []
