"""RelP's default rules: train pairs share nothing with eval pairs, and the per-family rule lookup
(explicit rules win; a family without a default gets every rule, and the run says so)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from residlab.analyses.patching import relp_defaults
from residlab.analyses.patching.faithfulness import measure_faithfulness
from residlab.analyses.patching.relp import RelpRules
from residlab.analyses.patching.relp_defaults import FamilyRules, choose_rules
from residlab.cli.main import app
from residlab.core.errors import ResidlabError
from residlab.data.facts import CAPITAL_PROMPT
from residlab.data.prompt_pairs import HELD_OUT_PAIRS, PromptPair, capital_pairs, ioi_pairs, load_pairs
from residlab.testing import save_tiny_model, tiny_model

PAIRS = [
    PromptPair("Natalia sold clips in May", "Natalia sold clips in April", " and", " then"),
    PromptPair("The answer is 72", "The answer is 24", ".", " +"),
]


class WordTokenizer:
    """One token per word; words over five letters are two (so the filters drop some names)."""

    def __call__(self, text: str, **kwargs: object) -> dict[str, list[int]]:
        ids = [(sum(map(ord, w)), len(w.strip(",.")) > 5) for w in text.split()]
        return {"input_ids": [i for code, long in ids for i in ([code, code + 1] if long else [code])]}


def _country(prompt: str) -> str:
    head, tail = CAPITAL_PROMPT.split("{subject}")
    return prompt.removeprefix(head).removesuffix(tail)


def test_eval_pairs_are_todays_seed_zero_pairs():
    assert ioi_pairs(2) == ioi_pairs(2, split="eval")
    assert ioi_pairs(1)[0].clean == "While Jane and Tom were working at the garden, Tom gave a kiss to"
    assert [p.clean for p in capital_pairs(2)] == ["The capital of Bangladesh is", "The capital of Australia is"]


@pytest.mark.parametrize("tokenizer", [None, WordTokenizer()])
@pytest.mark.parametrize("seed", [0, 3])
def test_ioi_train_pairs_share_no_prompt_with_eval_pairs(tokenizer, seed):
    held_out = ioi_pairs(HELD_OUT_PAIRS, tokenizer=tokenizer, seed=seed)
    train = ioi_pairs(64, tokenizer=tokenizer, seed=seed, split="train")
    eval_texts = {t for p in held_out for t in (p.clean, p.corrupted)}
    train_texts = {t for p in train for t in (p.clean, p.corrupted)}
    assert len(train) == 64 and len(set(train)) > 32  # a real sample, not one pair repeated
    assert not eval_texts & train_texts
    # The train stream alone would have collided: the rejection is doing work, not luck.
    assert train != ioi_pairs(64, tokenizer=tokenizer, seed=seed)


@pytest.mark.parametrize("tokenizer", [None, WordTokenizer()])
def test_capital_train_pairs_use_no_eval_country(tokenizer):
    held_out = capital_pairs(HELD_OUT_PAIRS, tokenizer=tokenizer)
    train = capital_pairs(None, tokenizer=tokenizer, split="train")
    eval_countries = {_country(t) for p in held_out for t in (p.clean, p.corrupted)}
    train_countries = {_country(t) for p in train for t in (p.clean, p.corrupted)}
    assert len(train) >= 16 and train_countries
    assert not eval_countries & train_countries
    assert load_pairs("capitals", n=4, tokenizer=tokenizer, split="train") == train[:4]


def test_bad_split_is_a_clear_error(tmp_path):
    with pytest.raises(ResidlabError, match="unknown prompt-pair split") as info:
        ioi_pairs(2, split="test")
    assert "eval, train" in (info.value.hint or "")
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"clean": "a", "corrupted": "b", "answer": " c", "wrong": " d"}) + "\n")
    with pytest.raises(ResidlabError, match="no train split"):
        load_pairs(str(path), split="train")


def test_explicit_rules_win_over_the_family_default(monkeypatch):
    monkeypatch.setitem(relp_defaults.DEFAULT_RULES, "llama", FamilyRules(RelpRules(gated=False)))
    mine = RelpRules(norm=False, attention=False)
    explicit = choose_rules("llama", mine)
    assert explicit.source == "explicit (given by the caller)"
    assert all(explicit.rules.for_family(f) == mine for f in ("resid", "attn", "mlp", "heads", "neurons"))
    default = choose_rules("llama")
    assert default.rules == FamilyRules(RelpRules(gated=False)) and default.source.startswith("default for llama")


def test_family_rules_group_the_component_families_into_passes():
    split = FamilyRules(RelpRules(gated=False), ((("attn", "heads"), RelpRules(attention=False)),))
    assert split.for_family("resid") == split.for_family("neurons") == RelpRules(gated=False)
    assert split.for_family("heads") == RelpRules(attention=False)
    assert split.passes(["resid", "attn", "mlp", "heads"]) == {
        RelpRules(gated=False): ("resid", "mlp"),
        RelpRules(attention=False): ("attn", "heads"),
    }
    assert split.passes(["mlp"]) == {RelpRules(gated=False): ("mlp",)}  # a pass only for a family asked for


def test_unknown_family_falls_back_to_every_rule_and_says_so():
    choice = choose_rules("no-such-family")
    assert choice.rules == FamilyRules(RelpRules())
    assert "fallback" in choice.source and "no-such-family" in choice.source


def test_the_table_holds_typed_rules_for_mapped_families():
    from residlab.models.architectures import ARCHITECTURES

    families = {arch.family for arch in ARCHITECTURES.values()}
    for family, rules in relp_defaults.DEFAULT_RULES.items():
        assert family in families and isinstance(rules, FamilyRules) and isinstance(rules.default, RelpRules)
        for names, group_rules in rules.groups:
            assert set(names) <= {"resid", "attn", "mlp", "heads", "neurons"} and isinstance(group_rules, RelpRules)


def test_measure_faithfulness_runs_the_family_default_and_records_where_it_came_from(monkeypatch):
    lm = tiny_model("llama")
    monkeypatch.setitem(relp_defaults.DEFAULT_RULES, "llama", FamilyRules(RelpRules(attention=False, gated=False)))
    lines: list[str] = []
    run = measure_faithfulness(lm, PAIRS, families=["resid"], methods=["relp"], log=lines.append)
    assert [r.split(":")[0] for r in run.rules] == ["norm", "activation"]
    assert run.rules_source.startswith("default for llama")
    assert any(line.startswith("RelP rules: norm, activation (default for llama") for line in lines)
    explicit = measure_faithfulness(lm, PAIRS, families=["resid"], methods=["relp"], rules=RelpRules(norm=False))
    assert {r.split(":")[0] for r in explicit.rules} == {"activation", "attention", "gated"}
    assert explicit.rules_source.startswith("explicit")


def test_fallback_family_is_named_in_the_run(monkeypatch):
    monkeypatch.delitem(relp_defaults.DEFAULT_RULES, "gpt2", raising=False)
    run = measure_faithfulness(tiny_model("gpt2"), PAIRS, families=["mlp"], methods=["relp"])
    assert "fallback" in run.rules_source and "gpt2" in run.rules_source
    assert {r.split(":")[0] for r in run.rules} == {"norm", "activation", "attention", "gated"}


def test_patch_command_reports_the_rules_and_their_source(tmp_path):
    model = str(save_tiny_model(tmp_path / "tiny-qwen", "qwen2"))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p.__dict__) + "\n" for p in PAIRS))
    runner = CliRunner(env={"COLUMNS": "200"})
    for rules, expect in (("default", ("default for qwen2", "fallback: no default chosen for qwen2")),
                          ("norm,gated", ("explicit",))):  # fmt: skip
        out = tmp_path / rules.replace(",", "-")
        args = ["patch", "-m", model, "--dataset", str(path), "--sites", "resid", "--rules", rules, "--out", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        data = json.loads((out / "patching.json").read_text())
        assert data["rules_source"].startswith(expect)
        assert data["rules_source"] in (out / "report.md").read_text()
    assert [r.split(":")[0] for r in data["rules"]] == ["norm", "gated"]


def test_two_rule_sets_take_two_passes_and_each_family_gets_its_own_estimate(monkeypatch):
    """Per-family rules: each family's RelP estimate equals a run with that family's rules alone."""
    lm = tiny_model("qwen2")
    split = FamilyRules(RelpRules(gated=False), ((("attn", "heads"), RelpRules(attention=False, gated=False)),))
    monkeypatch.setitem(relp_defaults.DEFAULT_RULES, "qwen2", split)
    lines: list[str] = []
    both = measure_faithfulness(lm, PAIRS, families=["resid", "attn"], methods=["exact", "relp"], log=lines.append)
    assert any("relp:" in line and "2 backward passes" in line for line in lines)
    assert any(line.startswith("RelP rules for attn: norm, activation (default for qwen2") for line in lines)
    by_family = {f.family: f for f in both.families}
    assert [r.split(":")[0] for r in by_family["resid"].rules] == ["norm", "activation", "attention"]
    assert [r.split(":")[0] for r in by_family["attn"].rules] == ["norm", "activation"]
    assert any(line.startswith("[attn] norm:") for line in both.rules)
    for family, rules in (("resid", RelpRules(gated=False)), ("attn", RelpRules(attention=False, gated=False))):
        alone = measure_faithfulness(lm, PAIRS, families=[family], methods=["relp"], rules=rules)
        # equal up to rounding: the two sets share one forward pass, whose attention runs the eager kernel
        alone_effects, shared_effects = alone.families[0].effects["relp"], by_family[family].effects["relp"]
        assert torch.allclose(torch.tensor(alone_effects), torch.tensor(shared_effects), rtol=1e-5, atol=1e-6)
        assert alone_effects != [[0.0] * len(row) for row in alone_effects]
        assert alone.families[0].rules == by_family[family].rules
    # one rule set for every family: one pass, and the rule lines carry no family prefix
    one = measure_faithfulness(lm, PAIRS, families=["resid", "attn"], methods=["relp"], rules=RelpRules())
    assert [r.split(":")[0] for r in one.rules] == ["norm", "activation", "gated", "attention"]


def test_patch_command_takes_a_rule_set_per_family_group(tmp_path, monkeypatch):
    monkeypatch.setitem(relp_defaults.DEFAULT_RULES, "qwen2", FamilyRules(RelpRules(activation=False, attention=False)))
    model = str(save_tiny_model(tmp_path / "tiny-qwen", "qwen2"))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p.__dict__) + "\n" for p in PAIRS))
    runner = CliRunner(env={"COLUMNS": "200"})
    out = tmp_path / "grouped"
    rules = "resid=norm+attention;attn,heads=activation"
    args = ["patch", "-m", model, "--dataset", str(path), "--sites", "resid,attn,mlp", "--methods", "exact,relp"]
    result = runner.invoke(app, [*args, "--rules", rules, "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "patching.json").read_text())
    used = {f["family"]: [r.split(":")[0] for r in f["rules"]] for f in data["families"]}
    # mlp is in no group: it keeps the table's default for qwen2 (patched here to a known set)
    assert data["rules_source"].startswith("explicit for resid, attn, heads (given by the caller); the rest: default")
    assert used == {
        "resid": ["norm", "attention"],
        "attn": ["activation"],
        "mlp": ["norm", "gated"],
    }
    assert "RelP rules" in (out / "report.md").read_text() and "norm+attention" in (out / "report.md").read_text()
    twice = runner.invoke(app, [*args, "--rules", "resid=norm;resid,attn=none", "--out", str(tmp_path / "bad")])
    assert twice.exit_code != 0 and "a family twice" in twice.output
    two_defaults = runner.invoke(app, [*args, "--rules", "norm;activation", "--out", str(tmp_path / "bad3")])
    assert two_defaults.exit_code != 0 and "twice" in two_defaults.output
    bogus = runner.invoke(app, [*args, "--rules", "resid=norm+bogus", "--out", str(tmp_path / "bad2")])
    assert bogus.exit_code != 0 and "bogus" in bogus.output


def test_family_rules_check_their_names_and_fill_gaps_from_a_base():
    with pytest.raises(ResidlabError, match="unknown families head"):
        FamilyRules(RelpRules(), ((("head",), RelpRules()),))
    with pytest.raises(ResidlabError, match="a family twice"):
        FamilyRules(RelpRules(), ((("attn",), RelpRules()), (("attn", "mlp"), RelpRules(norm=False))))
    partial = FamilyRules(None, ((("attn",), RelpRules(norm=False)),))
    with pytest.raises(ResidlabError, match="no RelP rules for resid"):
        partial.for_family("resid")
    base = FamilyRules(RelpRules(gated=False), ((("attn", "heads"), RelpRules(attention=False)),))
    merged = partial.over(base)
    assert merged.for_family("attn") == RelpRules(norm=False)  # the caller's group wins
    assert merged.for_family("heads") == RelpRules(attention=False)  # the base's group, less what was named
    assert merged.for_family("resid") == RelpRules(gated=False)


def test_applied_rule_names_follow_one_order_and_skip_what_did_not_apply():
    from residlab.analyses.patching.relp import applied_rule_names

    lines = ["norm: 3 norm modules", "activation: x", "gated: not applicable (no gated MLP)", "attention: y"]
    assert applied_rule_names(lines) == ("norm", "activation", "attention")
    assert applied_rule_names(["gated: half rule", "norm: z"]) == ("norm", "gated")


def test_a_group_without_rules_is_named_in_the_run_lines():
    no_rule = RelpRules(norm=False, activation=False, attention=False, gated=False)
    rules = FamilyRules(RelpRules(), ((("resid",), no_rule),))
    run = measure_faithfulness(tiny_model("qwen2"), PAIRS, families=["resid", "attn"], methods=["relp"], rules=rules)
    assert "[resid] none" in run.rules and any(line.startswith("[attn] norm:") for line in run.rules)


def test_each_estimate_is_timed_over_its_own_passes(monkeypatch):
    """AtP's and RelP's seconds include their forward and backward passes (both run lazily inside the
    timed loop), not only the clean pass: a pass made 0.3 s slower shows up in its method's seconds."""
    from residlab.analyses.patching import faithfulness

    lm = tiny_model("qwen2")
    slow_attribute, slow_each = faithfulness.attribute, faithfulness.attribute_each

    def attribute(*args, **kwargs):
        time.sleep(0.3)
        return slow_attribute(*args, **kwargs)

    def attribute_each(*args, **kwargs):
        for attribution in slow_each(*args, **kwargs):
            time.sleep(0.3)
            yield attribution

    monkeypatch.setattr(faithfulness, "attribute", attribute)
    monkeypatch.setattr(faithfulness, "attribute_each", attribute_each)
    result = measure_faithfulness(lm, PAIRS, families=["resid"], methods=["atp", "relp"], rules=RelpRules())
    seconds = result.families[0].seconds
    assert seconds["atp"] >= 0.3 and seconds["relp"] >= 0.3, seconds
