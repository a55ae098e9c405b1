import pytest

from residlab.cli.options import (
    DEFAULT_POSITIONS,
    Layers,
    parse_dtype_name,
    parse_engine,
    parse_layers,
    parse_positions,
    parse_strength,
)
from residlab.core.errors import ResidlabError


@pytest.mark.parametrize(
    "text, layers",
    [("8:20:4", (8, 12, 16)), ("8:11", (8, 9, 10)), ("8,12,16", (8, 12, 16)), ("12", (12,)), (" 3, 5", (3, 5))],
)
def test_parse_layers(text, layers):
    parsed = parse_layers(text)
    assert parsed == layers and isinstance(parsed, Layers)


@pytest.mark.parametrize("text", ["abc", "", "1,,2", "1:2:3:4", "8:20:0", "8:", "1.5"])
def test_parse_layers_rejects(text):
    with pytest.raises(ResidlabError, match="cannot read layers") as err:
        parse_layers(text)
    assert "8:20:2" in err.value.hint


def test_parse_layers_rejects_an_empty_range():
    with pytest.raises(ResidlabError, match="select no layer"):
        parse_layers("20:8")


def test_parse_positions():
    assert parse_positions("0,-1").rule == (0, -1)
    named = parse_positions("prompt")
    assert named.rule == "prompt" and str(named) == "prompt"
    assert DEFAULT_POSITIONS == parse_positions("prompt_last+generated")
    with pytest.raises(ResidlabError, match="unknown position rule 'last'"):
        parse_positions("last")  # a recording rule, not a steering one


def test_parse_strength():
    assert parse_strength("-0.5") == -0.5 and parse_strength("1e-1") == 0.1
    for text in ("nan", "inf", "-Infinity"):
        with pytest.raises(ResidlabError, match="not a finite number"):
            parse_strength(text)
    with pytest.raises(ResidlabError, match="cannot read strength"):
        parse_strength("0.5x")


def test_parse_dtype_and_engine():
    assert parse_dtype_name("bf16") == "bf16" and parse_dtype_name("auto") == "auto"
    assert parse_engine("auto") == "auto" and parse_engine("llamacpp") == "llamacpp"
    with pytest.raises(ResidlabError, match="unknown dtype"):
        parse_dtype_name("float8")
    with pytest.raises(ResidlabError, match="unknown engine"):
        parse_engine("vllm")


def test_every_shared_option_declares_and_parses(tmp_path):
    """All the shared types on one command, as the ASC commands use them (sweep's layers default included)."""
    from pathlib import Path

    import typer
    from typer.testing import CliRunner

    from residlab.cli.errors import handle_errors
    from residlab.cli.options import (
        DataDirOption,
        DtypeOption,
        EngineOption,
        LayersOption,
        ModelOption,
        PositionsOption,
        StrengthOption,
        WorkDirOption,
    )

    seen = {}
    app = typer.Typer()

    @app.command()
    @handle_errors
    def command(
        model: ModelOption = "tiny",
        engine: EngineOption = "auto",
        dtype: DtypeOption = "auto",
        data_dir: DataDirOption = None,
        work_dir: WorkDirOption = Path("residlab-out"),
        layers: LayersOption = Layers((12,)),
        positions: PositionsOption = DEFAULT_POSITIONS,
        strength: StrengthOption = 1.0,
    ) -> None:
        seen.update(
            model=model,
            engine=engine,
            dtype=dtype,
            data_dir=data_dir,
            work_dir=work_dir,
            layers=layers,
            positions=positions,
            strength=strength,
        )

    cli = CliRunner()
    assert cli.invoke(app, []).exit_code == 0
    assert seen == {
        "model": "tiny",
        "engine": "auto",
        "dtype": "auto",
        "data_dir": None,
        "work_dir": Path("residlab-out"),
        "layers": (12,),
        "positions": DEFAULT_POSITIONS,
        "strength": 1.0,
    }
    args = ["-m", "m", "--engine", "torch", "--dtype", "fp16", "--data-dir", str(tmp_path), "--work-dir", "w"]
    result = cli.invoke(app, [*args, "--layers", "2:8:3", "--positions", "all", "--strength", "-2"])
    assert result.exit_code == 0, result.output
    assert seen["layers"] == (2, 5) and seen["positions"].rule == "all" and seen["strength"] == -2.0
    assert seen["data_dir"] == tmp_path and seen["work_dir"] == Path("w") and seen["dtype"] == "fp16"
    bad = cli.invoke(app, ["--layers", "2:8:x"])
    assert bad.exit_code == 2 and "error: cannot read layers '2:8:x'." in bad.output
