import json

import pytest
import torch
from conftest import random_vector
from hypothesis import given, settings
from hypothesis import strategies as st

from residlab import ModelMismatchError, ResidlabError, SteeringVector
from residlab.testing import tiny_model


def test_save_load_round_trip(qwen, tmp_path):
    vec = random_vector(qwen, [0, 2])
    vec = SteeringVector(**{**vec.__dict__, "info": {"pairs": 12, "note": "x"}, "position_rule": "generated"})
    path = vec.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(path, model=qwen)
    assert back.layers == [0, 2]
    for layer in back.layers:
        assert torch.equal(back.directions[layer], vec.directions[layer])
    assert back.model_name == "tiny-qwen2" and back.hidden_size == 64 and back.num_layers == 3
    assert back.position_rule == "generated" and back.info == {"pairs": 12, "note": "x"}
    assert back.created == vec.created
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["layer_convention"] == "block_output"
    assert json.loads(meta["norms"])["0"] == pytest.approx(vec.norm(0), rel=1e-5)


def test_wrong_model_is_a_clear_error(qwen, tmp_path):
    path = random_vector(qwen, [1]).save(tmp_path / "v.safetensors")
    other_shape = tiny_model("llama", hidden=32)
    with pytest.raises(ModelMismatchError, match="hidden size 64"):
        SteeringVector.load(path, model=other_shape)
    same_shape_other_name = tiny_model("llama")
    with pytest.raises(ModelMismatchError, match="made for tiny-qwen2"):
        SteeringVector.load(path, model=same_shape_other_name)
    SteeringVector.load(path, model=same_shape_other_name, strict=False)  # the user's explicit override


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_a_clear_error(qwen, tmp_path, damage):
    path = random_vector(qwen, [1]).save(tmp_path / "v.safetensors")
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a file" * 10, "empty": b""}[damage])
    with pytest.raises(ResidlabError, match="not a readable safetensors file"):
        SteeringVector.load(path)


def test_foreign_safetensors_and_missing_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ResidlabError, match="not a residlab steering vector"):
        SteeringVector.load(tmp_path / "other.safetensors")
    with pytest.raises(ResidlabError, match="no steering vector file"):
        SteeringVector.load(tmp_path / "missing.safetensors")


def test_validation(qwen):
    with pytest.raises(ResidlabError, match="expected hidden size"):
        SteeringVector.from_tensor(torch.zeros(5), model=qwen, layer=0)
    with pytest.raises(ResidlabError, match="NaN"):
        SteeringVector.from_tensor(torch.full((64,), float("nan")), model=qwen, layer=0)
    with pytest.raises(ResidlabError, match="does not exist"):
        SteeringVector.from_tensor(torch.zeros(64), model=qwen, layer=9)
    with pytest.raises(ResidlabError, match="zero"):
        SteeringVector.from_tensor(torch.zeros(64), model=qwen, layer=0).normalized()


def test_arithmetic_and_cosine(qwen):
    a, b = random_vector(qwen, [1, 2], seed=1), random_vector(qwen, [1, 2], seed=2)
    torch.testing.assert_close((a + b).directions[1], a.directions[1] + b.directions[1])
    torch.testing.assert_close((a - b).directions[2], a.directions[2] - b.directions[2])
    torch.testing.assert_close((2 * a).directions[1], 2 * a.directions[1])
    torch.testing.assert_close((-a).directions[1], -a.directions[1])
    assert a.cosine(a) == pytest.approx(1.0)
    assert a.cosine(-a) == pytest.approx(-1.0)
    assert all(n == pytest.approx(1.0) for n in a.normalized().norms.values())
    assert a.select([2]).layers == [2]
    with pytest.raises(ResidlabError, match="layers differ"):
        _ = a + a.select([1])
    assert isinstance(a.directions[1], torch.Tensor) and a.directions[1].dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=64, max_size=64), st.floats(0.01, 10.0))
def test_scaling_preserves_direction(values, factor):
    lm = (
        tiny_model("qwen2")
        if not hasattr(test_scaling_preserves_direction, "lm")
        else test_scaling_preserves_direction.lm
    )
    test_scaling_preserves_direction.lm = lm
    t = torch.tensor(values)
    if float(t.norm()) < 1e-3:
        return
    v = SteeringVector.from_tensor(t, model=lm, layer=0)
    assert (v * factor).cosine(v) == pytest.approx(1.0, abs=1e-5)
    assert (v * factor).norm() == pytest.approx(v.norm() * factor, rel=1e-5)


def test_project_out_removes_exactly_the_component_along_the_other(qwen):
    a, b = random_vector(qwen, [1, 2], seed=3), random_vector(qwen, [0, 1, 2], seed=4)
    cleaned = a.project_out(b)
    for layer in (1, 2):
        u = b.directions[layer] / b.directions[layer].norm()
        assert float(cleaned.directions[layer] @ u) == pytest.approx(0.0, abs=1e-4)
        # What is left is a minus its projection: adding the projection back gives a again.
        along = float(a.directions[layer] @ u) * u
        torch.testing.assert_close(cleaned.directions[layer] + along, a.directions[layer])
    assert cleaned.layers == [1, 2] and "minus its component" in cleaned.source
    assert a.project_out(a).norm(1) == pytest.approx(0.0, abs=1e-4)
    zero = SteeringVector.from_layers({1: torch.zeros(64), 2: torch.zeros(64)}, model=qwen, source="zero")
    torch.testing.assert_close(a.project_out(zero).directions[1], a.directions[1])
    with pytest.raises(ResidlabError, match="no direction at layer"):
        a.project_out(b.select([1]))
