"""llama.cpp control-vector GGUF files: export, import (residlab's, llama.cpp's, repeng's), errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_vector

from residlab import ModelMismatchError, ResidlabError, SteeringVector
from residlab.vectors.files import load_vector
from residlab.vectors.gguf_control import export_control_vector, import_control_vector, read_control_vector


def _foreign_file(path, layers: dict[int, np.ndarray], hint="qwen2"):
    """A file as llama.cpp's cvector-generator / repeng write it: no residlab keys, uint32 layer count."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(layers))
    for layer, direction in layers.items():
        writer.add_tensor(f"direction.{layer}", direction.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_round_trip_keeps_directions_and_metadata(qwen, tmp_path):
    vec = random_vector(qwen, [1, 2]).normalized()
    vec = SteeringVector(**{**vec.__dict__, "info": {**vec.info, "strength": 2.5}, "position_rule": "generated"})
    path = export_control_vector(vec, tmp_path / "v.gguf", model_hint="qwen2")
    back = import_control_vector(path, qwen)
    assert back.layers == vec.layers
    for layer in vec.layers:
        torch.testing.assert_close(back.directions[layer], vec.directions[layer])
    assert (back.model_name, back.position_rule, back.info["strength"]) == (vec.model_name, "generated", 2.5)


def test_export_writes_llama_cpp_layout_scaled_by_strength(qwen, tmp_path):
    from gguf import GGUFReader

    vec = random_vector(qwen, [1, 2])
    vec = SteeringVector(**{**vec.__dict__, "info": {"strength": 4.0}})
    reader = GGUFReader(str(export_control_vector(vec, tmp_path / "v.gguf")))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]  # block-output numbering, unchanged
    np.testing.assert_allclose(tensors["direction.2"], vec.directions[2].numpy() * 4.0, rtol=1e-6)
    # An explicit scale wins over the recorded strength, and the importer divides it back out.
    path = export_control_vector(vec, tmp_path / "s1.gguf", scale=1.0)
    np.testing.assert_allclose(
        {t.name: np.asarray(t.data) for t in GGUFReader(str(path)).tensors}["direction.2"], vec.directions[2].numpy()
    )


def test_layer_zero_cannot_be_exported(qwen, tmp_path):
    with pytest.raises(ResidlabError, match="layer 0"):
        export_control_vector(random_vector(qwen, [0, 1]), tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()


def test_foreign_file_needs_the_model_and_loads_with_it(qwen, tmp_path):
    d = qwen.hidden_size
    path = _foreign_file(tmp_path / "repeng.gguf", {1: np.ones(d), 2: np.arange(d, dtype=np.float32)})
    with pytest.raises(ResidlabError, match="needs the model"):
        import_control_vector(path)
    vec = import_control_vector(path, qwen)
    assert vec.model_name == qwen.name and vec.layers == [1, 2] and vec.position_rule == "all"
    np.testing.assert_allclose(vec.directions[2].numpy(), np.arange(d))


def test_file_for_another_hidden_size_is_a_clear_error(qwen, tmp_path):
    path = _foreign_file(tmp_path / "big.gguf", {1: np.ones(qwen.hidden_size * 2)})
    with pytest.raises(ModelMismatchError, match="hidden size"):
        import_control_vector(path, qwen)
    deep = _foreign_file(tmp_path / "deep.gguf", {qwen.num_layers + 3: np.ones(qwen.hidden_size)})
    with pytest.raises(ModelMismatchError, match="deeper model"):
        import_control_vector(deep, qwen)
    other = random_vector(qwen, [1])
    other = SteeringVector(**{**other.__dict__, "model_name": "someone-else"})
    with pytest.raises(ModelMismatchError, match="someone-else"):
        import_control_vector(export_control_vector(other, tmp_path / "o.gguf"), qwen)


def test_bad_files_are_reported(qwen, tmp_path):
    with pytest.raises(ResidlabError, match="no control-vector file"):
        import_control_vector(tmp_path / "missing.gguf", qwen)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    with pytest.raises(ResidlabError, match="not a readable GGUF"):
        import_control_vector(junk, qwen)
    from gguf import GGUFWriter

    model_file = tmp_path / "model.gguf"
    writer = GGUFWriter(str(model_file), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ResidlabError, match="not a control vector"):
        import_control_vector(model_file, qwen)


def test_load_vector_dispatches_on_suffix(qwen, tmp_path):
    vec = random_vector(qwen, [1])
    a = load_vector(vec.save(tmp_path / "v.safetensors"), qwen)
    b = load_vector(export_control_vector(vec, tmp_path / "v.gguf"), qwen)
    torch.testing.assert_close(a.directions[1], b.directions[1])
    (tmp_path / "v.txt").write_text("x")
    with pytest.raises(ResidlabError, match="neither"):
        load_vector(tmp_path / "v.txt", qwen)


def test_cli_converts_both_ways(qwen, tmp_path):
    from typer.testing import CliRunner

    from residlab.cli.main import app
    from residlab.testing import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny", "qwen2")
    vec = random_vector(qwen, [1, 2])
    vec = SteeringVector(**{**vec.__dict__, "model_name": "tiny"})
    src = vec.save(tmp_path / "v.safetensors")
    runner = CliRunner()
    out = runner.invoke(app, ["vector", "export", str(src), str(tmp_path / "v.gguf"), "--scale", "1"])
    assert out.exit_code == 0, out.output
    foreign = _foreign_file(tmp_path / "f.gguf", {2: np.ones(qwen.hidden_size)})
    out = runner.invoke(app, ["vector", "import", str(foreign), str(tmp_path / "f.safetensors"), "-m", str(model_dir)])
    assert out.exit_code == 0, out.output
    assert SteeringVector.load(tmp_path / "f.safetensors").layers == [2]
    out = runner.invoke(app, ["vector", "export", str(src), str(tmp_path / "x.gguf"), "--layers", "0"])
    assert out.exit_code == 2 and "layer 0" in out.output


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), 0.0])
def test_export_refuses_scales_that_make_an_unreadable_file(tmp_path, qwen, scale):
    vec = SteeringVector.from_tensor(torch.ones(qwen.hidden_size), model=qwen, layer=1)
    target = tmp_path / "v.gguf"
    with pytest.raises(ResidlabError, match="cannot export with scale"):
        export_control_vector(vec, target, scale=scale)
    assert not target.exists()


def test_cli_generate_steers_a_foreign_file_with_its_own_rule(qwen, tmp_path):
    # Regression: `residlab generate --vector their.gguf` steered prompt_last+generated, not the rule the
    # file records (all, as llama.cpp and repeng apply it), so it did not reproduce what they do.
    import json

    from typer.testing import CliRunner

    from residlab.cli.main import app
    from residlab.testing import save_tiny_model

    model_dir = str(save_tiny_model(tmp_path / "tiny", "qwen2"))
    g = np.random.default_rng(0)
    foreign = _foreign_file(tmp_path / "theirs.gguf", {1: g.normal(size=qwen.hidden_size) * 8})
    runner = CliRunner()

    def generate(*extra):
        args = ["generate", "-m", model_dir, "-p", "Natalia sold clips", "--max-new-tokens", "6", "--json"]
        out = runner.invoke(app, [*args, "--vector", str(foreign), "--engine", "torch", *extra])
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout.strip().splitlines()[0])["text"], out.stderr

    default, note = generate()
    assert "steered (strength 1.0, all: the vector's recorded rule)" in note
    assert default == generate("--positions", "all")[0]
    other, note = generate("--positions", "prompt_last+generated")
    assert other != default and "steered (strength 1.0, prompt_last+generated)" in note


def test_export_names_the_architecture_not_the_model(qwen, tmp_path):
    # Regression: controlvector.model_hint held residlab's model name ("tiny-qwen2"), so repeng warned of a
    # model-type mismatch; it must be the architecture (config.model_type), as repeng writes it.
    from gguf import GGUFReader

    vec = random_vector(qwen, [1])
    assert vec.model_type == qwen.model.config.model_type == "qwen2"
    hint = GGUFReader(str(export_control_vector(vec, tmp_path / "v.gguf"))).fields["controlvector.model_hint"]
    assert hint.contents() == "qwen2"
    assert SteeringVector.load(vec.save(tmp_path / "v.safetensors")).model_type == "qwen2"  # survives a file
    assert import_control_vector(tmp_path / "v.gguf", qwen).model_type == "qwen2"
    older = SteeringVector(**{**vec.__dict__, "model_type": ""})  # a file saved before vectors recorded it
    reader = GGUFReader(str(export_control_vector(older, tmp_path / "old.gguf")))
    assert reader.fields["controlvector.model_hint"].contents() == "unknown"  # repeng needs the key
    assert read_control_vector(tmp_path / "old.gguf").model_hint == ""
    explicit = export_control_vector(older, tmp_path / "hinted.gguf", model_hint="qwen2")
    assert GGUFReader(str(explicit)).fields["controlvector.model_hint"].contents() == "qwen2"


def test_float64_and_float16_files_are_read_as_float32(qwen, tmp_path):
    # Regression: repeng writes numpy's float64 directions; residlab refused them with no way forward.
    d = qwen.hidden_size
    g = np.random.default_rng(1)
    wide, half = g.normal(size=d), g.normal(size=d).astype(np.float16)
    path = _foreign_file(tmp_path / "f64.gguf", {1: wide, 2: half})
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "mixed.gguf"), "controlvector")
    writer.add_string("controlvector.model_hint", "qwen2")
    writer.add_tensor("direction.1", wide)  # float64 as stored
    writer.add_tensor("direction.2", half)  # float16
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vec = import_control_vector(tmp_path / "mixed.gguf", qwen)
    np.testing.assert_allclose(vec.directions[1].numpy(), wide.astype(np.float32))
    np.testing.assert_allclose(vec.directions[2].numpy(), half.astype(np.float32))
    assert vec.info["converted_from"] == "F16/F64" and vec.model_type == "qwen2"
    assert "converted_from" not in import_control_vector(path, qwen).info  # stored as float32 already
    ints = tmp_path / "ints.gguf"
    writer = GGUFWriter(str(ints), "controlvector")
    writer.add_tensor("direction.1", np.ones(d, dtype=np.int8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ResidlabError, match="I8") as info:
        import_control_vector(ints, qwen)
    assert "float32" in info.value.hint


def test_cli_shows_a_foreign_file_without_a_model(qwen, tmp_path):
    # Regression: `vector show their.gguf` failed with a hint naming a --model option that `show` lacked.
    from typer.testing import CliRunner

    from residlab.cli.main import app
    from residlab.testing import save_tiny_model

    g = np.random.default_rng(2)
    from gguf import GGUFWriter

    path = tmp_path / "repeng.gguf"
    writer = GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "qwen2")
    writer.add_uint32("controlvector.layer_count", 2)
    for layer in (1, 2):
        writer.add_tensor(f"direction.{layer}", g.normal(size=qwen.hidden_size))  # float64, as repeng writes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    runner = CliRunner(env={"COLUMNS": "200"})
    out = runner.invoke(app, ["vector", "show", str(path)])
    assert out.exit_code == 0, out.output
    for expected in ("architecture: qwen2", "direction size: 64", "layers: [1, 2]", "position rule: all", "F64"):
        assert expected in out.output
    model_dir = str(save_tiny_model(tmp_path / "tiny", "qwen2"))
    out = runner.invoke(app, ["vector", "show", str(path), "--model", model_dir])
    assert out.exit_code == 0, out.output
    assert "model: tiny (hidden size 64, 3 layers)" in out.output and "converted_from" in out.output
    narrow = _foreign_file(tmp_path / "narrow.gguf", {1: np.ones(32)})
    wrong = runner.invoke(app, ["vector", "show", str(narrow), "--model", model_dir])
    assert wrong.exit_code == 2 and "hidden size" in wrong.output
    # every hint `vector show` gives names only options it has
    import re

    options = {"--model", "-m", "--help"}
    for result in (out, wrong):
        for option in re.findall(r"--[a-z-]+", result.output.split("hint:")[-1] if "hint:" in result.output else ""):
            assert option in options, result.output
    # a converted F64 file exports back as the F32 file llama.cpp needs
    out = runner.invoke(
        app, ["vector", "import", str(path), str(tmp_path / "r.safetensors"), "-m", model_dir, "--force"]
    )
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["vector", "export", str(tmp_path / "r.safetensors"), str(tmp_path / "r.gguf")])
    assert out.exit_code == 0, out.output
    assert read_control_vector(tmp_path / "r.gguf").tensor_types == ("F32",)
    assert "architecture qwen2" in out.output
