"""Model-agnostic extraction: contrast pairs (texts, chats, prompt + completions) -> a SteeringVector."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import residlab as rl
from residlab import ResidlabError, SteeringVector
from residlab.recipes.contrast_pairs import ContrastPair, read_pairs
from residlab.recipes.extraction import (
    AGGREGATORS,
    ReadPosition,
    completion_states,
    extract,
    logistic_direction,
    mean_difference,
)
from residlab.testing import save_tiny_model, tiny_model

PAIRS = [
    ("I love this film, it is wonderful.", "I hate this film, it is awful."),
    ("What a happy day.", "What a sad day."),
    ("She smiled at everyone.", "She glared at everyone."),
    ("Great news for all of us!", "Terrible news for all of us!"),
    ("The food was delicious.", "The food was disgusting."),
]


def _hf_states(lm, text: str, layer: int, *, add_special_tokens: bool = True) -> torch.Tensor:
    """Independent of residlab's reader: HF hidden_states[layer + 1] of one text, [tokens, d]."""
    ids = lm.tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_text_pairs_read_at_the_last_token_match_hugging_face(family):
    lm = tiny_model(family)
    vec = extract(lm, PAIRS, layers=[0, 1], batch_size=2)
    for layer in (0, 1):
        expected = torch.stack([_hf_states(lm, p, layer)[-1] - _hf_states(lm, n, layer)[-1] for p, n in PAIRS]).mean(0)
        torch.testing.assert_close(vec.directions[layer], expected, rtol=1e-4, atol=1e-4)
    assert vec.layers == [0, 1] and vec.model_type == lm.model_type
    assert vec.info["method"] == "mean_diff" and vec.info["read"] == "last" and vec.info["n_pairs"] == len(PAIRS)
    assert set(vec.info["separation"]) == {"0", "1"} and vec.position_rule == "prompt_last+generated"


@pytest.mark.parametrize(
    "read, pick",
    [
        ("mean", lambda s: s.mean(0)),
        (0, lambda s: s[0]),
        (-2, lambda s: s[-2]),
        ("1:3", lambda s: s[1:3].mean(0)),
        ([0, 2], lambda s: s[0:2].mean(0)),
        ("first:2", lambda s: s[:2].mean(0)),
    ],
)
def test_read_positions(qwen, read, pick):
    vec = extract(qwen, PAIRS[:3], layers=[1], read=read, batch_size=3)
    expected = torch.stack([pick(_hf_states(qwen, p, 1)) - pick(_hf_states(qwen, n, 1)) for p, n in PAIRS[:3]]).mean(0)
    torch.testing.assert_close(vec.directions[1], expected, rtol=1e-4, atol=1e-4)


def test_prompt_completions_and_a_per_pair_read(qwen):
    pairs = [
        ContrastPair("A joy to watch.", "A bore to watch.", prompt="Review the film."),
        ContrastPair("Lovely.", "Dreadful.", prompt="Review the film.", read="last"),
    ]
    vec = extract(qwen, pairs, layers=[1], read="mean")
    head = qwen.format_prompt("Review the film.")  # through the chat template (the tokenizer has one)
    n_head = len(qwen.tokenizer(head, add_special_tokens=False)["input_ids"])

    def state(pair, text):
        states = _hf_states(qwen, head + text, 1, add_special_tokens=False)
        return states[n_head:].mean(0) if pair.read is None else states[-1]

    expected = torch.stack([state(p, p.positive) - state(p, p.negative) for p in pairs]).mean(0)
    torch.testing.assert_close(vec.directions[1], expected, rtol=1e-4, atol=1e-4)


def test_chat_pairs_leave_the_reply_open(qwen):
    def chat(reply):
        return [{"role": "user", "content": "How was it?"}, {"role": "assistant", "content": reply}]

    vec = extract(qwen, [(chat("Wonderful!"), chat("Awful!")), (chat("Great fun."), chat("No fun."))], layers=[1])
    texts = {
        r: qwen.tokenizer.apply_chat_template(chat(r), tokenize=False, continue_final_message=True)
        for r in ("Wonderful!", "Awful!", "Great fun.", "No fun.")
    }
    assert all(t.endswith(r) for r, t in texts.items())  # read at the reply's last token, not an end marker

    def last(reply):
        return _hf_states(qwen, texts[reply], 1, add_special_tokens=False)[-1]

    expected = ((last("Wonderful!") - last("Awful!")) + (last("Great fun.") - last("No fun."))) / 2
    torch.testing.assert_close(vec.directions[1], expected, rtol=1e-4, atol=1e-4)


def test_methods_custom_aggregators_and_batching(qwen, monkeypatch):
    base = extract(qwen, PAIRS, layers=[1, 2], batch_size=1)
    batched = extract(qwen, PAIRS, layers=[1, 2], batch_size=4)
    torch.testing.assert_close(base.directions[2], batched.directions[2], rtol=1e-4, atol=1e-4)
    for method in ("pca", "logistic"):
        other = extract(qwen, PAIRS, layers=[1, 2], method=method)
        assert other.cosine(base, layer=2) > 0 and other.info["method"] == method  # oriented like the mean

    def first_pair(positive, negative):
        return positive[0] - negative[0]

    monkeypatch.setitem(AGGREGATORS, "first_pair", first_pair)
    named = extract(qwen, PAIRS, layers=[1], method="first_pair")
    direct = extract(qwen, PAIRS, layers=[1], method=first_pair)
    torch.testing.assert_close(named.directions[1], direct.directions[1])
    assert direct.info["method"] == "first_pair"
    with pytest.raises(ResidlabError, match="unknown method 'median'"):
        extract(qwen, PAIRS, method="median")


def test_logistic_finds_the_discriminating_direction_where_the_mean_difference_does_not():
    """Classes that differ along e0 + e1 but with a huge spread along e0: the best separating direction
    is (close to) e1, while the mean difference points along e0 + e1."""
    g = torch.Generator().manual_seed(0)
    n, d = 200, 8
    spread = torch.ones(d)
    spread[0] = 30.0
    shift = torch.zeros(d)
    shift[:2] = 1.0
    positive = torch.randn(n, d, generator=g) * spread + shift
    negative = torch.randn(n, d, generator=g) * spread - shift
    fisher = torch.zeros(d)
    fisher[0], fisher[1] = 1 / 900, 1.0  # Sigma^-1 (mu+ - mu-), up to scale
    fisher = fisher / fisher.norm()
    logistic = logistic_direction(positive, negative)
    mean = mean_difference(positive, negative)
    cos = torch.nn.functional.cosine_similarity
    assert cos(logistic, fisher, dim=0) > 0.95 > cos(mean / mean.norm(), fisher, dim=0)
    assert float(logistic @ mean) > 0
    again = logistic_direction(positive, negative)
    assert torch.equal(logistic, again)  # deterministic


def test_bad_pairs_and_read_positions_are_clear_errors(qwen, tmp_path):
    with pytest.raises(ResidlabError, match="no contrast pairs"):
        extract(qwen, [])
    with pytest.raises(ResidlabError, match="selects no token"):
        extract(qwen, PAIRS, read=40)
    with pytest.raises(ResidlabError, match="unknown read mode"):
        ReadPosition.parse("middle")
    with pytest.raises(ResidlabError, match="must be a text"):
        ContrastPair([{"role": "user", "content": "x"}], "y", prompt="p")
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"positive": "a", "negative": "b"}\n{"positive": "c", "negtive": "d"}\n')
    with pytest.raises(ResidlabError, match=r"pairs.jsonl:2: no negative field"):
        read_pairs(path)
    path.write_text('{"positive": "a", "negative": 3}\n')
    with pytest.raises(ResidlabError, match=r"pairs.jsonl:1: the negative side is int"):
        read_pairs(path)


def _old_completion_states(lm, heads, completions, *, read="mean", batch_size=4, add_special_tokens=False):
    """completion_states as it was before the generic reader (kept here to pin the ASC vector's numbers)."""
    first_n = int(read[6:]) if read.startswith("first:") else None
    out = []
    layers = range(lm.num_layers)
    for start in range(0, len(heads), batch_size):
        head_batch = heads[start : start + batch_size]
        full = [h + t for h, t in zip(head_batch, completions[start : start + batch_size], strict=True)]
        head_lengths = [len(lm.tokenizer(h, add_special_tokens=add_special_tokens)["input_ids"]) for h in head_batch]
        batch = lm.encode(full, add_special_tokens=add_special_tokens)
        with lm.record(layers=layers, positions="all") as rec:
            lm.forward(batch)
        stacked = torch.stack([rec[layer] for layer in layers], dim=1).float()
        width = batch.input_ids.shape[1]
        for row, (n, head) in enumerate(zip(batch.lengths.tolist(), head_lengths, strict=True)):
            states = stacked[row, :, width - n + head :, :]
            if first_n is not None:
                states = states[:, :first_n, :]
            out.append(states[:, -1, :] if read == "last" else states.mean(dim=1))
    return torch.stack(out)


@pytest.mark.parametrize("read", ["mean", "last", "first:3"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_completion_states_are_bit_identical_to_before(family, read):
    lm = tiny_model(family)
    heads = [lm.format_prompt(p) for p, _ in PAIRS]
    completions = [n for _, n in PAIRS]
    for special in (False, True):
        new = completion_states(lm, heads, completions, read=read, batch_size=2, add_special_tokens=special)
        old = _old_completion_states(lm, heads, completions, read=read, batch_size=2, add_special_tokens=special)
        assert torch.equal(new, old)


def test_cli_extract_writes_a_vector_that_generate_uses(tmp_path):
    model_dir = str(save_tiny_model(tmp_path / "tiny", "qwen2"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in PAIRS))
    out = tmp_path / "v.safetensors"
    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["extract", "--pairs", str(pairs), "-m", model_dir, "--layers", "1,2", "--method", "logistic"]
    app = _app()
    result = runner.invoke(app, [*args, "--out", str(out), "--positions", "all"])
    assert result.exit_code == 0, result.output
    assert "best-separated layer" in result.output and "separation" in result.output
    vec = SteeringVector.load(out)
    assert vec.layers == [1, 2] and vec.position_rule == "all" and vec.info["method"] == "logistic"
    expected = extract(rl.load(model_dir), read_pairs(pairs), layers=[1, 2], method="logistic")
    torch.testing.assert_close(vec.directions[2], expected.directions[2])
    again = runner.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 2 and "exists already" in again.output
    unit = runner.invoke(app, [*args, "--out", str(tmp_path / "u.safetensors"), "--normalize"])
    assert unit.exit_code == 0 and abs(SteeringVector.load(tmp_path / "u.safetensors").norm(1) - 1) < 1e-5
    steered = runner.invoke(
        app, ["generate", "-m", model_dir, "-p", "Hi", "--vector", str(out), "--max-new-tokens", "2"]
    )
    assert steered.exit_code == 0, steered.output
    assert "all: the vector's recorded rule" in steered.stderr
    pairs.write_text('{"positive": "a"}\n')
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "w.safetensors")])
    assert bad.exit_code == 2 and "pairs.jsonl:1: no negative field" in bad.output
    bad = runner.invoke(app, [*args[:-1], "median", "--out", str(tmp_path / "w.safetensors")])
    assert bad.exit_code == 2 and "unknown method 'median'" in bad.output


def _app():
    from residlab.cli.main import app

    return app
