"""The one I/O layer: strict reading of users' files, NaN-safe JSON, atomic figures."""

import json
import math

import pytest

from residlab.core.errors import ResidlabError
from residlab.core.io import iter_jsonl, write_json
from residlab.core.plotting import pyplot, save_figure
from residlab.core.records import JsonlStore
from residlab.methods.asc.pairs import read_pairs_file


def test_pairs_file_without_trailing_newline_keeps_its_last_record(tmp_path):
    # Regression: the crash-recovery store dropped a last line without "\n" as a torn write.
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"id": "a", "concise": "1+1=2"}\n{"id": "b", "concise": "2+2=4"}')
    assert read_pairs_file(path) == {"a": "1+1=2", "b": "2+2=4"}
    # ... while residlab's own append-only records still treat such a tail as a torn write
    assert [r["id"] for r in JsonlStore(path).read()] == ["a"]


def test_pairs_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"id": "a", "concise": "x"}\n\n{"id": "b"}\n')
    with pytest.raises(ResidlabError, match=r"pairs.jsonl:3: needs the fields 'id' and 'concise'"):
        read_pairs_file(path)
    with pytest.raises(ResidlabError, match="no pairs file at"):
        read_pairs_file(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"a": 1}\n{"a": \n', r"x.jsonl:2: not valid JSON"),
        (b'{"a": 1}\n[1, 2]', r"x.jsonl:2: expected a JSON object, got list"),
        (b'{"a": 1}\n{"a": "\xff"}\n', r"x.jsonl:2: not UTF-8 text"),
    ],
)
def test_iter_jsonl_one_wording(tmp_path, content, expected):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(ResidlabError, match=expected) as info:
        list(iter_jsonl(path))
    assert info.value.hint


def test_iter_jsonl_skips_blank_lines_and_numbers_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('\n{"a": 1}\n  \n{"a": 2}')
    assert list(iter_jsonl(path)) == [(2, {"a": 1}), (4, {"a": 2})]


def test_write_json_turns_nan_into_null(tmp_path):
    payload = {"kl_used_median": float("nan"), "nested": [1.0, float("inf")], "ok": 0.5, "pair": (1, 2)}
    path = write_json(tmp_path / "report.json", payload)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(constant):
        raise ValueError(constant)

    data = json.loads(text, parse_constant=refuse)  # strict JSON: a bare NaN would raise here
    assert data == {"kl_used_median": None, "nested": [1.0, None], "ok": 0.5, "pair": [1, 2]}


def test_save_figure_is_atomic_and_a_png(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, math.pi])
    path = save_figure(fig, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no temporary left behind
