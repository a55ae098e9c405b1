"""Faults a long run meets: concurrent writers, kills mid-write, torn and NUL-filled record files."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from residlab.core.errors import ResidlabError
from residlab.core.records import JsonlStore


def _writer(path: str, worker: int, count: int) -> None:
    store = JsonlStore(path)
    for i in range(count):
        # every worker writes the same ids (as two identical runs would), each with its own payload
        store.append([{"id": f"p{i}", "worker": worker, "output": "x" * (200 + 37 * worker)}])


def test_concurrent_writers_share_one_file_without_duplicates_or_torn_lines(tmp_path):
    path = tmp_path / "records.jsonl"
    workers = [multiprocessing.Process(target=_writer, args=(str(path), w, 150)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a complete line
    records = [json.loads(line) for line in lines[:-1]]  # every line parses: nothing torn or interleaved
    assert sorted(r["id"] for r in records) == sorted(f"p{i}" for i in range(150))  # each id exactly once
    assert JsonlStore(path).read() == records


def test_append_returns_what_the_store_holds(tmp_path):
    store = JsonlStore(tmp_path / "r.jsonl")
    assert store.append([{"id": "a", "v": 1}]) == [{"id": "a", "v": 1}]
    assert store.append([{"id": "a", "v": 2}, {"id": "b", "v": 3}]) == [{"id": "a", "v": 1}, {"id": "b", "v": 3}]
    assert [r["v"] for r in store.read()] == [1, 3]
    plain = JsonlStore(tmp_path / "log.jsonl", unique_key=None)  # a log keeps everything
    plain.append([{"id": "a"}, {"id": "a"}])
    assert len(plain.read()) == 2


@pytest.mark.parametrize("tail", [b'{"id": "c", "v"', b"\x00" * 64, b"\x00" * 30 + b"\n", b"\x00\x00\n\x00\x00\n"])
def test_torn_or_nul_tail_is_dropped_and_cut_on_the_next_append(tmp_path, tail):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n' + tail)
    store = JsonlStore(path)
    assert [r["id"] for r in store.read()] == ["a", "b"]
    store.append([{"id": "c"}])
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'


def test_nul_bytes_inside_the_file_are_reported_with_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": "a"}\n\x00\x00\x00\n{"id": "b"}\n')
    with pytest.raises(ResidlabError, match=r"r.jsonl:2: not a JSON record"):
        JsonlStore(path).read()


def test_kill_during_writes_loses_nothing_complete(tmp_path):
    path = tmp_path / "r.jsonl"
    script = textwrap.dedent(
        f"""
        from residlab.core.records import JsonlStore
        store = JsonlStore({str(path)!r})
        i = 0
        while True:
            store.append([{{"id": f"p{{i}}", "output": "y" * 5000}} for i in range(i, i + 20)])
            i += 20
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 30
    while (not path.exists() or path.stat().st_size < 400_000) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    store = JsonlStore(path)
    ids = [r["id"] for r in store.read()]
    assert ids == [f"p{i}" for i in range(len(ids))] and len(ids) >= 20  # a complete prefix, in order
    store.append([{"id": "after-kill"}])
    assert [r["id"] for r in store.read()] == [*ids, "after-kill"]
