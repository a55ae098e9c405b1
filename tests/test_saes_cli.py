"""``residlab sae ...`` end to end on a tiny saved model and a user text file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from residlab.cli.main import app
from residlab.testing import save_tiny_model

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sae_cli")
    model = save_tiny_model(tmp / "model")
    corpus = tmp / "docs.txt"
    corpus.write_text("\n".join(f"Line {i} says that {i} plus {i} makes {2 * i} apples." for i in range(200)))
    return tmp, str(model), str(corpus)


def _run(*args: str) -> str:
    result = RUNNER.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_sae_train_eval_decompose_latent(setup):
    tmp, model, corpus = setup
    common = ["--corpus", corpus, "--work-dir", str(tmp / "work")]
    _run("sae", "harvest", "--model", model, "--layer", "1", "--tokens", "1500", "--eval-tokens", "300", *common)
    run = tmp / "run"
    train = ["sae", "train", "--model", model, "--layer", "1", "--tokens", "1500", "--expansion", "2", "--k", "4"]
    _run(*train, "--batch-size", "128", "--dead-window", "500", "--out", str(run), *common)
    assert (run / "sae" / "cfg.json").is_file() and (run / "report.md").is_file()
    assert (run / "training_curve.png").is_file()
    _run(
        "sae", "eval", "--sae", str(run / "sae"), "--model", model, "--eval-tokens", "300", "--ce-windows", "4", *common
    )
    report = json.loads((run / "sae" / "eval" / "sae_eval.json").read_text())
    assert 0 < report["summary"]["l0"] <= 4 and "ce_loss_recovered" in report["summary"]
    vector = tmp / "latent.safetensors"
    _run(
        "sae",
        "latent",
        "--sae",
        str(run / "sae"),
        "--model",
        model,
        "--latent",
        "3",
        "--output",
        str(vector),
        "--scale",
        "2",
    )
    _run(
        "sae",
        "decompose",
        "--sae",
        str(run / "sae"),
        "--model",
        model,
        "--vector",
        str(vector),
        "--out",
        str(tmp / "dec"),
        "--eval-tokens",
        "300",
        *common,
    )
    decomposition = json.loads((tmp / "dec" / "decomposition.json").read_text())
    top = decomposition["fit"][0]
    assert top["latent"] == 3 and decomposition["explained_fraction"] > 0.99
    # Each fitted latent carries what it fires on in held-out text, as the dashboard shows it.
    assert top["density"] > 0 and top["contexts"] and any(tok[2] for tok in top["contexts"][0]["tokens"])
    assert top["contexts"][0]["max"] == max(c["max"] for c in top["contexts"])
    report = (tmp / "dec" / "report.md").read_text()
    (row,) = [line for line in report.splitlines() if line.startswith("| 3 |")]
    assert report.startswith("# latent.safetensors") and "[" in row.rsplit("|", 2)[1]  # the peak token
    assert (tmp / "dec" / "latents.html").is_file()


def test_sae_errors_are_clear(setup):
    tmp, model, _ = setup
    from residlab.saes import HookPoint, TopKConfig, build_sae
    from residlab.saes.files import save_sae

    sae_dir = tmp / "untrained-sae"
    save_sae(build_sae(TopKConfig(d_in=64, d_sae=128, k=4, hook=HookPoint(model, 1))), sae_dir)
    # A missing vector is reported before the model loads or any text is harvested.
    missing = ["sae", "decompose", "--sae", str(sae_dir), "--vector", str(tmp / "none.safetensors")]
    result = RUNNER.invoke(app, [*missing, "--work-dir", str(tmp / "never")])
    assert result.exit_code != 0 and "no steering vector file" in result.output and not (tmp / "never").exists()
    # --no-contexts needs no corpus: the fit and the logit lens only.
    vector = tmp / "for-decompose.safetensors"
    _run("sae", "latent", "--sae", str(sae_dir), "--model", model, "--latent", "5", "--output", str(vector))
    _run(
        "sae",
        "decompose",
        "--sae",
        str(sae_dir),
        "--model",
        model,
        "--vector",
        str(vector),
        "--no-contexts",
        "--corpus",
        "nope",
        "--out",
        str(tmp / "dec-plain"),
    )
    (fitted, *_) = json.loads((tmp / "dec-plain" / "decomposition.json").read_text())["fit"]
    assert fitted["latent"] == 5 and fitted["promoted"] and "contexts" not in fitted
    assert not (tmp / "dec-plain" / "latents.html").exists()  # its cards would lack density and contexts
    result = RUNNER.invoke(app, ["sae", "harvest", "--model", model, "--corpus", "nope", "--work-dir", str(tmp)])
    assert result.exit_code != 0 and "unknown corpus" in result.output
