"""``residlab analyze recall`` on a tiny model dir: files, tables and clear errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from residlab.cli.main import app
from residlab.core.errors import ResidlabError
from residlab.data.recall_prompts import RECALL_TEMPLATES, capital_prompts, parse_templates, read_recall_file
from residlab.testing import save_tiny_model

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "tiny-gemma", "gemma3"))


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    rows = [
        {"prompt": "Natalia sold clips to 48 of her", "answer": "friends", "subject": "Natalia"},
        {"prompt": "Weng earns $12 an hour for", "answer": "babysitting", "subject": "Weng"},
        {"prompt": "How many clips did Natalia", "answer": "sell"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_analyze_recall_writes_json_figures_and_findings(tiny_dir, prompt_file, tmp_path):
    out = tmp_path / "recall"
    result = runner.invoke(
        app,
        ["analyze", "recall", "-m", tiny_dir, "--prompt-file", str(prompt_file), "--knockout-k", "1,2",
         "--random-draws", "1", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mover-head candidates" in result.stdout and "final_layer_suppression:" in result.stdout
    data = json.loads((out / "recall.json").read_text())
    assert data["num_prompts"] == 3 and data["prompts_with_subject"] == 2
    assert data["dla_sum_max_error"] < 1e-4
    assert [k["k"] for k in data["knockouts"]] == [1, 2]
    assert set(data["summary"]) >= {"accuracy", "dla_sum_max_error", "finding_mover_heads"}
    assert {p.name for p in out.iterdir()} == {
        "recall.json",
        "recall_dla.png",
        "recall_movers.png",
        "recall_ablations.png",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--templates", "nope"], "unknown recall template"),
        (["--knockout-k", "x"], "cannot read --knockout-k"),
        (["--knockout-k", "999"], "knockout sizes"),
    ],
)
def test_analyze_recall_bad_options_are_clear_errors(tiny_dir, args, message, tmp_path):
    result = runner.invoke(app, ["analyze", "recall", "-m", tiny_dir, "--limit", "3", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output and "hint:" in result.output


def test_recall_file_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "The capital of France is", "answer": "Paris", "subject": "Spain"}) + "\n")
    with pytest.raises(ResidlabError, match="does not occur in the prompt"):
        read_recall_file(path)
    path.write_text(json.dumps({"prompt": "The capital of France is"}) + "\n")
    with pytest.raises(ResidlabError, match=r"bad.jsonl:1: field 'answer'"):
        read_recall_file(path)
    path.write_text(json.dumps({"prompt": "The capital of France is", "answer": "Paris"}) + "\n")
    with pytest.raises(ResidlabError, match="at least 2"):
        read_recall_file(path)


def test_capital_prompts_and_templates():
    prompts = capital_prompts(("capital_of", "question"), limit=3)
    assert len(prompts) == 6
    assert prompts[0].prompt == "The capital of France is" and prompts[0].answer == "Paris"
    assert prompts[3].prompt == "Q: What is the capital of France?\nA:" and prompts[3].template == "question"
    assert all(p.subject in p.prompt for p in prompts)
    assert parse_templates("all") == tuple(RECALL_TEMPLATES)
    assert len(capital_prompts()) == 80
