"""Server processes starting together on one data dir agree on one signing key."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from syncengine.server.app import SERVER_KEY_FILE, load_or_create_server_key


def test_concurrent_first_starts_share_one_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(lambda _: load_or_create_server_key(data).public, range(32)))
    assert len(set(keys)) == 1
    path = data / SERVER_KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in data.iterdir()) == [SERVER_KEY_FILE]  # no temp files left
    assert load_or_create_server_key(data).public == keys[0]  # stable across restarts
