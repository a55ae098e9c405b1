"""``residlab analyze recall``: the factual-recall analysis (arXiv 2403.19521), JSON + PNG plots + tables.

Registered on the ``analyze`` command group (importing this module adds the command).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from residlab.cli.analyze_commands import _fmt, _log, analyze_app, console
from residlab.cli.errors import handle_errors
from residlab.cli.options import DeviceOption, DtypeOption, ModelOption
from residlab.core.errors import ResidlabError
from residlab.models.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from residlab.analyses.recall import RecallResult
    from residlab.data.recall_prompts import RecallPrompt


def _prompts(prompt_file: Path | None, templates: str, limit: int | None) -> list[RecallPrompt]:
    from residlab.data.recall_prompts import capital_prompts, parse_templates, read_recall_file

    if prompt_file is not None:
        return read_recall_file(prompt_file, limit=limit)
    return capital_prompts(parse_templates(templates), limit=limit)


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ResidlabError(f"cannot read --knockout-k {text!r}.", hint="pass sizes such as 1,3,5,10.") from None
    if not ks:
        raise ResidlabError("--knockout-k names no size.", hint="pass sizes such as 1,3,5,10.")
    return ks


def _print(result: RecallResult) -> None:
    c = result.clean
    console.print(
        f"{result.model}: {result.num_prompts} prompts ({', '.join(result.templates)}), accuracy {c.accuracy:.1%}, "
        f"mean p(answer) {c.mean_prob:.3f}, mean logit(answer) - logit(wrong) {c.mean_logit_diff:+.2f}; "
        f"DLA parts add up to the {result.dla_target} within {result.dla_sum_max_error:.1e}"
    )
    heads = Table(title="mover-head candidates (last position)")
    for column in ("head", "attn to subject", "DLA answer", "DLA ans-wrong", "next MLP along head"):
        heads.add_column(column, justify="right")
    for h in result.candidates:
        heads.add_row(
            f"L{h.layer}H{h.head}", _fmt(h.subject_attention), _fmt(h.dla, "+.2f"), _fmt(h.dla_diff, "+.2f"),
            _fmt(h.mlp_along, "+.2f"),
        )  # fmt: skip
    console.print(heads)
    knockouts = Table(
        title="mean-ablation knockouts of the top-k candidates", caption="drops of the mean logit difference"
    )
    for column in ("k", "drop", "random k", "accuracy after", "direct", "via MLPs", "other attn"):
        knockouts.add_column(column, justify="right")
    for k in result.knockouts:
        knockouts.add_row(
            str(k.k), _fmt(k.drop_logit_diff, "+.2f"), _fmt(k.random_drop_logit_diff, "+.2f"),
            _fmt(100 * k.after.accuracy, ".1f") + "%", _fmt(k.direct_drop, "+.2f"), _fmt(k.via_mlps, "+.2f"),
            _fmt(k.via_other_attention, "+.2f"),
        )  # fmt: skip
    console.print(knockouts)
    f = result.final_layer
    final = Table(
        title=f"last layer ({f.layer}): DLA on the answer attn {f.attn_dla:+.2f} / MLP {f.mlp_dla:+.2f} "
        f"(centred {f.attn_dla_centred:+.2f} / {f.mlp_dla_centred:+.2f})"
    )
    for column in ("removed", "mode", "accuracy", "change", "p(answer)", "change"):
        final.add_column(column, justify="right")
    for a in f.ablations:
        final.add_row(
            a.target, a.mode, f"{a.after.accuracy:.1%}", f"{a.accuracy_change:+.1%}", _fmt(a.after.mean_prob),
            _fmt(a.prob_change, "+.3f"),
        )  # fmt: skip
    console.print(final)
    for finding in result.findings:
        verdict = {True: "holds", False: "does not hold", None: "not measurable"}[finding.holds]
        console.print(f"{finding.name}: {verdict}. {finding.evidence}")


@analyze_app.command()
@handle_errors
def recall(
    model: ModelOption = DEFAULT_MODEL,
    prompt_file: Annotated[
        Path | None,
        typer.Option(
            help='JSONL of {"prompt", "answer"[, "subject"]} (default: the shipped country -> capital table).'
        ),
    ] = None,
    templates: Annotated[
        str, typer.Option(help="Templates for the capitals table: 'all' or names (capital_of, question, ...).")
    ] = "capital_of",
    limit: Annotated[int | None, typer.Option(min=1, help="First N countries (or N prompts of --prompt-file).")] = None,
    knockout_k: Annotated[str, typer.Option(help="How many top candidates to knock out together, e.g. 1,3,5,10.")] = (
        "1,3,5,10"
    ),
    random_draws: Annotated[int, typer.Option(min=0, help="Random k-head knockouts (largest k) as a control.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the random control heads.")] = 0,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: ./residlab-out/analyses/<model>/recall).")
    ] = None,
) -> None:
    """Factual recall: DLA of every head and MLP, mover heads, knockouts, final-layer suppression."""
    from residlab.analyses.common import safe_name
    from residlab.analyses.recall import analyze_recall
    from residlab.core.io import check_writable_dir
    from residlab.models.loading import load

    started = time.perf_counter()
    prompts = _prompts(prompt_file, templates, limit)  # a bad file fails before a slow load
    ks = _parse_ks(knockout_k)
    check_writable_dir(out if out is not None else Path("residlab-out") / "analyses")
    lm = load(model, dtype=dtype, device=device)
    _log(f"loaded {lm.name} ({lm.num_layers} layers); {len(prompts)} recall prompts")
    result = analyze_recall(
        lm,
        prompts,
        knockout_ks=ks,
        random_draws=random_draws,
        batch_size=batch_size,
        seed=seed,
        progress=True,
        log=_log,
    )
    out_dir = out if out is not None else Path("residlab-out") / "analyses" / safe_name(lm.name) / "recall"
    paths = result.save(out_dir)
    _print(result)
    console.print(f"wrote {len(paths)} files to {out_dir} in {time.perf_counter() - started:.0f} s:")
    for path in paths:
        console.print(f"  {path}")
