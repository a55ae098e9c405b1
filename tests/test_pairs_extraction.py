import json

import pytest
import torch

from residlab import ResidlabError
from residlab.data import synthetic_problems
from residlab.evaluation.records import EvalRecord
from residlab.evaluation.runner import Decoding
from residlab.methods.asc import prompts
from residlab.methods.asc.pairs import TracePair, build_pairs, reference_trace, shortest_correct
from residlab.methods.asc.vector import extract_vector
from residlab.recipes.extraction import completion_states

DECODING = Decoding(max_new_tokens=6, batch_size=4)


def test_reference_trace_ends_boxed():
    problem = synthetic_problems(1, seed=2)[0]
    trace = reference_trace(problem)
    assert trace.endswith(f"\\boxed{{{problem.answer}}}")
    assert "<<" not in trace


def test_pair_filtering(qwen, tmp_path):
    problems = synthetic_problems(4, seed=7)
    # A random tiny model never solves these: its verbose traces are wrong, the references right.
    kept, dropped = build_pairs(
        qwen, problems, source="reference", work_dir=tmp_path, decoding=DECODING, progress=False
    )
    assert kept == [] and dropped["verbose_wrong"] == 4
    kept, dropped = build_pairs(
        qwen, problems, source="reference", work_dir=tmp_path, decoding=DECODING, keep="concise_correct", progress=False
    )
    assert len(kept) == 4 and all(p.concise_correct and not p.verbose_correct for p in kept)
    pairs_file = tmp_path / "mine.jsonl"
    pairs_file.write_text(
        "".join(
            json.dumps({"id": p.id, "concise": f"\\boxed{{{p.answer if i % 2 else 'wrong'}}}"}) + "\n"
            for i, p in enumerate(problems)
        )
    )
    kept, dropped = build_pairs(
        qwen,
        problems,
        source="file",
        pairs_file=pairs_file,
        work_dir=tmp_path,
        decoding=DECODING,
        keep="concise_correct",
        progress=False,
    )
    assert [p.id for p in kept] == [problems[1].id, problems[3].id] and dropped["concise_wrong"] == 2
    with pytest.raises(ResidlabError, match="unknown concise source"):
        build_pairs(qwen, problems, source="oracle", work_dir=tmp_path, decoding=DECODING)


def _record(output, tokens, correct, hit_limit):
    return EvalRecord(
        id="p", condition="sample", output=output, tokens=tokens, hit_limit=hit_limit, seconds=0.1,
        batch_seconds=0.4, batch_size=4, extracted=None, rule="none", gold="1", correct=correct, time=0.0,
    )  # fmt: skip


def test_shortest_correct_prefers_correct_then_short():
    records = [
        _record("long right", 90, True, False),
        _record("short wrong", 10, False, False),
        _record("short right", 40, True, False),
        _record("cut off", 5, True, True),
    ]
    assert shortest_correct(records) == ("short right", True)
    assert shortest_correct(records[1:2] + records[3:]) == ("cut off", False)  # nothing counts as correct


def test_sampled_source_takes_the_shortest_sample_and_caches(qwen, tmp_path):
    problems = synthetic_problems(4, seed=5)
    decoding = Decoding(max_new_tokens=8, batch_size=4)
    kept, _ = build_pairs(
        qwen, problems, source="sampled", samples=3, keep="all", work_dir=tmp_path, decoding=decoding, progress=False
    )
    files = sorted(tmp_path.glob("sample-*.jsonl"))
    assert len(files) == 3  # one cached condition per sample seed
    samples = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    by_id = {p.id: [next(r for r in recs if r["id"] == p.id) for recs in samples] for p in problems}
    assert any(len({r["output"] for r in rs}) > 1 for rs in by_id.values())  # sampling, not greedy
    for pair in kept:
        fewest = min(r["tokens"] for r in by_id[pair.id])
        assert pair.concise in {r["output"] for r in by_id[pair.id] if r["tokens"] == fewest}
        assert pair.concise_source == "sampled" and not pair.concise_correct
    sizes = [f.stat().st_size for f in files]
    build_pairs(
        qwen, problems, source="sampled", samples=3, keep="all", work_dir=tmp_path, decoding=decoding, progress=False
    )
    assert [f.stat().st_size for f in files] == sizes  # the rerun generated nothing
    # With both_correct, problems whose verbose trace is wrong are not sampled at all.
    fresh = tmp_path / "fresh"
    kept, dropped = build_pairs(
        qwen, problems, source="sampled", samples=2, work_dir=fresh, decoding=decoding, progress=False
    )
    assert kept == [] and dropped["verbose_wrong"] == 4
    assert all(f.read_text() == "" for f in fresh.glob("sample-*.jsonl"))


def test_max_concise_ratio_drops_pairs_that_are_not_shorter(qwen, tmp_path):
    problems = synthetic_problems(3, seed=7)
    # 6-token verbose traces against full reference solutions: no reference is shorter.
    kept, dropped = build_pairs(
        qwen,
        problems,
        source="reference",
        keep="concise_correct",
        max_concise_ratio=1.0,
        work_dir=tmp_path,
        decoding=DECODING,
        progress=False,
    )
    assert kept == [] and dropped["concise_not_shorter"] == 3


def _pairs(n=6):
    problems = synthetic_problems(n, seed=11)
    return [
        TracePair(
            p.id,
            p.question,
            f"Let us think. First we read the problem. {p.solution} So the answer is \\boxed{{{p.answer}}}.",
            reference_trace(p),
            30,
            10,
            True,
            True,
            "reference",
        )
        for p in problems
    ]


def _manual_states(lm, pair_list, trace_of, layer):
    """Independent of residlab's recorder: HF hidden_states[layer + 1], averaged over the trace tokens."""
    states = []
    for pair in pair_list:
        head = lm.format_prompt(prompts.VERBOSE.format(question=pair.question))
        ids = lm.tokenizer(head + trace_of(pair), add_special_tokens=False, return_tensors="pt")["input_ids"]
        n_head = len(lm.tokenizer(head, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
        states.append(hidden[n_head:].mean(0))
    return torch.stack(states)


def _heads(lm, pairs):
    return [lm.format_prompt(prompts.VERBOSE.format(question=p.question)) for p in pairs]


def test_vector_sign_and_layer_convention(qwen):
    pairs = _pairs()
    result = extract_vector(qwen, pairs, read="mean", batch_size=4)
    layer = 1  # not the last block: HF applies the final norm to its last hidden state
    expected = (
        _manual_states(qwen, pairs, lambda p: p.concise, layer)
        - _manual_states(qwen, pairs, lambda p: p.verbose, layer)
    ).mean(0)
    torch.testing.assert_close(result.vector.directions[layer], expected, rtol=1e-4, atol=1e-4)
    assert result.vector.info["sign"] == "concise - verbose"
    assert set(result.separation) == set(range(qwen.num_layers))
    # the direction separates the two sides: concise projects higher than verbose on held-out folds
    assert result.separation[layer] > 0


def test_last_token_reading_and_pca(qwen):
    pairs = _pairs()
    states = completion_states(qwen, _heads(qwen, pairs), [p.concise for p in pairs], read="last")
    head = qwen.format_prompt(prompts.VERBOSE.format(question=pairs[0].question))
    ids = qwen.tokenizer(head + pairs[0].concise, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = qwen.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0, -1]
    torch.testing.assert_close(states[0, 1], hidden, rtol=1e-4, atol=1e-4)
    pca = extract_vector(qwen, pairs, method="pca")
    mean = extract_vector(qwen, pairs, method="mean_diff")
    assert pca.vector.cosine(mean.vector, layer=1) > 0  # oriented like the mean difference
    with pytest.raises(ResidlabError, match="no pairs"):
        extract_vector(qwen, [])


def test_first_n_reading(qwen):
    pairs = _pairs(2)
    first = completion_states(qwen, _heads(qwen, pairs), [p.verbose for p in pairs], read="first:3")
    head = qwen.format_prompt(prompts.VERBOSE.format(question=pairs[0].question))
    ids = qwen.tokenizer(head + pairs[0].verbose, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n_head = len(qwen.tokenizer(head, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        hidden = qwen.model(input_ids=ids, output_hidden_states=True).hidden_states[1][0]
    torch.testing.assert_close(first[0, 0], hidden[n_head : n_head + 3].mean(0), rtol=1e-4, atol=1e-4)
    with pytest.raises(ResidlabError, match="unknown read mode"):
        completion_states(qwen, ["q"], ["t"], read="first:x")
