"""``residlab patch`` end to end on a tiny model, the prompt-pair datasets, and one real-model check."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from residlab.cli.main import app
from residlab.core.errors import ResidlabError
from residlab.data.prompt_pairs import (
    IOI_NAMES,
    PromptPair,
    capital_pairs,
    ioi_pairs,
    load_pairs,
    read_pairs,
    token_counter,
)
from residlab.testing import save_tiny_model

runner = CliRunner(env={"COLUMNS": "200"})
PAIRS = [
    {
        "clean": "Natalia sold clips in May",
        "corrupted": "Natalia sold clips in April",
        "answer": " and",
        "wrong": " then",
    },
    {"clean": "The answer is 72", "corrupted": "The answer is 24", "answer": ".", "wrong": " +"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama", "llama"))


@pytest.fixture
def pair_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def test_patch_command_writes_effects_correlations_and_report(tiny_dir, pair_file, tmp_path):
    out = tmp_path / "out"
    args = ["patch", "-m", tiny_dir, "--dataset", str(pair_file), "--sites", "resid,attn,mlp,heads", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "patching.json").read_text())
    fams = {f["family"]: f for f in data["families"]}
    assert set(fams) == {"resid", "attn", "mlp", "heads"}
    assert len(fams["resid"]["effects"]["exact"]) == 3 and len(fams["heads"]["effects"]["relp"][0]) == 4
    assert fams["resid"]["num_sites"] == 3 * len(data["tokens"])
    for fam in fams.values():
        assert set(fam["pearson"]) == {"atp", "relp"} and set(fam["seconds"]) == {"exact", "atp", "relp"}
    # Patching the last layer's residual at the last position restores the clean score exactly.
    assert fams["resid"]["effects"]["exact"][-1][-1] == pytest.approx(
        data["clean_score"] - data["corrupted_score"], abs=1e-3
    )
    for name in ("positions.png", "heads.png", "scatter.png", "report.md"):
        assert (out / name).exists()
    report = (out / "report.md").read_text()
    assert "Pearson RelP" in report and "## Where the estimates miss exact patching" in report
    assert {"atp", "relp"} == set(data["summary"]["families"]["resid"]["misses"])


def test_patch_command_rejects_bad_input(tiny_dir, pair_file, tmp_path):
    bad = runner.invoke(app, ["patch", "-m", tiny_dir, "--dataset", str(pair_file), "--sites", "resid,bogus"])
    assert bad.exit_code != 0 and "unknown site family bogus" in bad.output and "hint:" in bad.output
    lines = tmp_path / "lines.jsonl"
    lines.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"clean": "x"}) + "\n")
    bad = runner.invoke(app, ["patch", "-m", tiny_dir, "--dataset", str(lines)])
    assert bad.exit_code != 0 and "lines.jsonl:2" in bad.output
    uneven = tmp_path / "uneven.jsonl"
    uneven.write_text(json.dumps({**PAIRS[0], "corrupted": "Weng sold clips to her friends in April"}) + "\n")
    bad = runner.invoke(app, ["patch", "-m", tiny_dir, "--dataset", str(uneven)])
    assert bad.exit_code != 0 and "equal token length" in bad.output


def test_ioi_pairs_follow_the_templates():
    pairs = ioi_pairs(6, seed=1)
    for i, pair in enumerate(pairs):
        io, s = pair.answer.strip(), pair.wrong.strip()
        assert io in IOI_NAMES and s in IOI_NAMES and io != s
        assert pair.clean.count(s) == 2 and pair.clean.count(io) == 1  # the subject is named twice
        assert pair.clean.index(io if i % 2 == 0 else s) < pair.clean.index(s if i % 2 == 0 else io)  # ABBA / BABA
        assert pair.corrupted.count(io) == 2 and pair.corrupted.count(s) == 1  # swap: the answer flips
    abc = ioi_pairs(4, corruption="abc")
    assert all(p.answer.strip() not in p.corrupted for p in abc)


class WordTokenizer:
    """A word-level tokenizer in which words longer than five letters are two tokens."""

    def __call__(self, text: str, **kwargs: object) -> dict[str, list[int]]:
        ids = [(sum(map(ord, w)), len(w.strip(",.")) > 5) for w in text.split()]
        return {"input_ids": [i for code, long in ids for i in ([code, code + 1] if long else [code])]}


def test_ioi_and_capitals_filter_by_the_tokenizer():
    tok = WordTokenizer()
    count = token_counter(tok)
    ioi, capitals = ioi_pairs(8, tokenizer=tok), capital_pairs(6, tokenizer=tok)
    for pair in ioi + capitals:
        assert count(pair.clean) == count(pair.corrupted)
    assert all(len(p.answer.strip()) <= 5 and len(p.wrong.strip()) <= 5 for p in ioi)  # one-token names only
    with pytest.raises(ResidlabError, match="single tokens"):
        ioi_pairs(4, tokenizer=type("T", (), {"__call__": lambda self, t, **k: {"input_ids": [1, 2]}})())


def test_capital_pairs_and_jsonl(pair_file, tmp_path):
    pairs = capital_pairs(5)
    assert all(p.clean.startswith("The capital of") and p.answer != p.wrong for p in pairs)
    assert read_pairs(pair_file)[1] == PromptPair(**PAIRS[1])
    assert len(load_pairs(str(pair_file), n=1)) == 1
    with pytest.raises(ResidlabError, match="unknown prompt-pair dataset"):
        load_pairs("nope")


@pytest.mark.real_model
def test_patch_real_model_ioi_relp_tracks_exact(tmp_path, monkeypatch):
    """``residlab patch`` on SmolLM2-135M (the packaged model small enough for ~30 s), 2 IOI pairs, MLP
    outputs: the model does IOI, the corruption flips it, and RelP follows exact patching."""
    monkeypatch.delenv("RESIDLAB_CACHE", raising=False)
    out = tmp_path / "out"
    args = ["patch", "-m", "smollm2-135m-instruct", "--dataset", "ioi", "--pairs", "2", "--sites", "mlp"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "patching.json").read_text())
    assert data["clean_score"] > 0 > data["corrupted_score"]  # the model does IOI; the corruption flips it
    mlp = data["families"][0]
    assert max(abs(v) for row in mlp["effects"]["exact"] for v in row) > 0.1
    assert mlp["pearson"]["relp"] > 0.8


def test_misses_name_the_sites_and_position_that_hold_the_estimate_error():
    from residlab.analyses.patching.faithfulness import FamilyEffects
    from residlab.analyses.patching.report import misses_of

    exact = [[1.0, 10.0, 0.0], [0.5, 10.0, 0.0]]  # layers x positions
    relp = [[1.0, 4.0, 0.0], [0.5, 7.0, 1.0]]  # errors 36 (layer 0, pos 1), 9 (layer 1, pos 1), 1
    fam = FamilyEffects("resid", "position", {"exact": exact, "relp": relp}, {}, {"relp": 0.5}, {"relp": 0.5})
    misses = misses_of(fam, "relp", ["a", "b", "c"], top=2)
    assert [(s["layer"], s["unit"]) for s in misses["sites"]] == [(0, "1 'b'"), (1, "1 'b'")]
    assert misses["sites"][0]["share"] == pytest.approx(36 / 46)
    assert misses["position"] == {"unit": "1 'b'", "share": pytest.approx(45 / 46)}
    broken = FamilyEffects("mlp", "position", {"exact": exact, "relp": [[float("nan"), 4.0, 0.0], relp[1]]}, {}, {}, {})
    assert misses_of(broken, "relp", ["a", "b", "c"])["nan_sites"] == 1
    assert misses_of(broken, "relp", ["a", "b", "c"])["position"]["share"] == pytest.approx(45 / 46)
    heads = FamilyEffects("heads", "head", {"exact": [[1.0, 0.0]], "atp": [[0.0, 0.0]]}, {}, {"atp": 0.1}, {"atp": 0.1})
    assert misses_of(heads, "atp", [])["sites"][0]["unit"] == "head 0" and "position" not in misses_of(heads, "atp", [])
