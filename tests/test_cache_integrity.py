"""Stage-cache entries carry per-file sha256 sums; a damaged entry is quarantined and rebuilt."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from make_your_3d.pipeline.cache import StageCache

KEY = "ab" * 32


def _writer(tmp):
    (tmp / "views").mkdir()
    (tmp / "views" / "a.png").write_bytes(b"\x89PNG" + bytes(range(200)))
    (tmp / "weights.bin").write_bytes(b"w" * 5000)


def test_entry_records_checksums_and_verifies(tmp_path):
    cache = StageCache(tmp_path)
    path = cache.build("multiview", KEY, _writer, {"seed": 1})
    record = json.loads((path / ".complete").read_text())
    assert set(record["files"]) == {"views/a.png", "weights.bin", "inputs.json"}
    assert all(len(v["sha256"]) == 64 and v["size"] > 0 for v in record["files"].values())
    assert cache.get("multiview", KEY) == path


def test_corrupt_entry_is_quarantined_and_rebuilt(tmp_path, caplog):
    cache = StageCache(tmp_path)
    path = cache.build("multiview", KEY, _writer)
    blob = bytearray((path / "weights.bin").read_bytes())
    blob[100] ^= 0xFF  # same size, one flipped byte
    (path / "weights.bin").write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="make_your_3d"):
        assert cache.get("multiview", KEY) is None
    assert not path.exists()
    quarantined = list((tmp_path / ".quarantine").iterdir())
    assert len(quarantined) == 1 and (quarantined[0] / "weights.bin").read_bytes() == bytes(blob)
    assert "weights.bin" in caplog.text and str(quarantined[0]) in caplog.text
    rebuilt = cache.build("multiview", KEY, _writer)
    assert cache.get("multiview", KEY) == rebuilt
    assert (rebuilt / "weights.bin").read_bytes() == b"w" * 5000


def test_missing_extra_and_unrecorded_entries_are_not_trusted(tmp_path):
    cache = StageCache(tmp_path)
    path = cache.build("a", KEY, _writer)
    (path / "views" / "a.png").unlink()
    assert cache.get("a", KEY) is None
    path = cache.build("b", KEY, _writer)
    (path / "weights.bin").write_bytes(b"w" * 10)  # truncated
    assert cache.get("b", KEY) is None
    # an entry from before checksums were recorded (an empty .complete) is rebuilt once
    legacy = tmp_path / "c" / KEY
    legacy.mkdir(parents=True)
    (legacy / "x.bin").write_bytes(b"1")
    (legacy / ".complete").write_text("")
    assert cache.get("c", KEY) is None and not legacy.exists()
    assert len(list((tmp_path / ".quarantine").iterdir())) == 3


def dead_pid() -> int:
    """The pid of a process that has exited (for temporary folders whose builder was killed)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


def test_remove_partial_clears_only_temp_folders_of_gone_builders(tmp_path):
    """The stage cache is one per user: a clean-up must remove what a killed build left, and never
    the temporary folder of a build running in another process."""
    cache = StageCache(tmp_path)
    good = cache.build("s", KEY, _writer)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed = tmp_path / "s" / f".{KEY[:12]}.{dead_pid()}.abcd1234"
        building = tmp_path / "s" / f".{KEY[:12]}.{live.pid}.abcd1234"
        old_unnamed = tmp_path / "s" / f".{KEY[:12]}.k3j2x9q1"  # from a version without pids in names
        new_unnamed = tmp_path / "s" / f".{KEY[:12]}.m5n6b7v8"
        for path in (killed, building, old_unnamed, new_unnamed):
            path.mkdir()
            (path / "half.bin").write_bytes(b"1")
        day_ago = time.time() - 25 * 3600
        os.utime(old_unnamed, (day_ago, day_ago))
        assert sorted(cache.remove_partial()) == sorted([killed, old_unnamed])
        assert building.exists() and new_unnamed.exists() and cache.get("s", KEY) == good
    finally:
        live.kill()
        live.wait(30)
    # a build names its temporary folder after its own pid
    seen = []
    cache.build("t", KEY, lambda tmp: seen.append(tmp.name))
    assert seen[0].split(".")[2] == str(os.getpid()), seen
