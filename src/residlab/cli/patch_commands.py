"""``residlab patch``: exact activation patching, AtP and RelP on prompt pairs, and how well they agree."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from residlab.cli.errors import err_console, handle_errors
from residlab.cli.options import DeviceOption, DtypeOption, ModelOption
from residlab.core.errors import ResidlabError
from residlab.models.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from residlab.analyses.patching.relp import RelpRules
    from residlab.analyses.patching.relp_defaults import FamilyRules
    from residlab.analyses.patching.report import PatchingResult

console = Console(highlight=False, soft_wrap=True)
RULES = ("norm", "activation", "attention", "gated")


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ResidlabError(
            f"unknown {what} {', '.join(unknown) or '(none)'}.", hint=f"use some of {', '.join(allowed)}."
        )
    return names


@handle_errors
def patch(
    dataset: Annotated[
        str, typer.Option(help="ioi, capitals, or a JSONL file of {clean, corrupted, answer, wrong} objects.")
    ] = "ioi",
    sites: Annotated[
        str, typer.Option(help="Component families: resid, attn, mlp, heads, neurons.")
    ] = "resid,attn,mlp,heads",
    methods: Annotated[str, typer.Option(help="exact, atp, relp (correlations need exact).")] = "exact,atp,relp",
    model: ModelOption = DEFAULT_MODEL,
    pairs: Annotated[int, typer.Option(min=1, help="Number of prompt pairs (capitals: at most one per country).")] = 16,
    metric: Annotated[str, typer.Option(help="logit_diff, probability or kl.")] = "logit_diff",
    window: Annotated[int, typer.Option(min=1, help="Patch windows of this many consecutive layers.")] = 1,
    rules: Annotated[
        str,
        typer.Option(
            help="The LRP rules RelP applies: default (the model family's, chosen on train pairs), none, "
            "some of norm, activation, attention, gated (every family), or a rule set per family group, one "
            "backward pass each: 'resid,mlp=norm+activation+attention;attn,heads=norm+activation' (families "
            "not named: a part without '=', else the model family's default)."
        ),
    ] = "default",
    ig_steps: Annotated[
        int,
        typer.Option(
            min=0,
            help="AtP and RelP gradients averaged over this many points of the embedding path from the "
            "corrupted to the clean prompt (integrated gradients; each point a forward and backward pass): "
            "more faithful where the model is far from linear between the runs, at roughly N/1.5 times the "
            "time (measured: 5.6x at 8, 10.9x at 16). Use 8 or more: 1 or 2 can be worse than 0. "
            "0: at the corrupted run.",
        ),
    ] = 0,
    max_rows: Annotated[int, typer.Option(min=1, help="Batch rows per patching forward pass (memory bound).")] = 256,
    seed: Annotated[int, typer.Option(help="Seed for the generated datasets.")] = 0,
    split: Annotated[str, typer.Option(help="eval, or train (generated pairs disjoint from the eval ones).")] = "eval",
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: ./residlab-out/patching/<model>/<dataset>).")
    ] = None,
) -> None:
    """Per-site patching effects (exact, AtP, RelP), their Pearson and Spearman r against exact
    patching per family, wall-clock per method, heatmaps and a report (patching.json, report.md, PNGs)."""
    from residlab.analyses.common import safe_name
    from residlab.analyses.patching.faithfulness import METHODS, measure_faithfulness
    from residlab.analyses.patching.report import PatchingResult
    from residlab.analyses.patching.sites import FAMILIES
    from residlab.core.io import check_writable_dir
    from residlab.data.prompt_pairs import load_pairs
    from residlab.models.loading import load

    started = time.perf_counter()
    families = _names(sites, tuple(FAMILIES), "site family")
    chosen_methods = _names(methods, METHODS, "method")
    relp_rules = _rules(rules)
    out_dir = out if out is not None else Path("residlab-out") / "patching"
    check_writable_dir(out_dir)
    lm = load(model, dtype=dtype, device=device)
    prompt_pairs = load_pairs(dataset, n=pairs, tokenizer=lm.tokenizer, seed=seed, split=split)
    err_console.print(f"loaded {lm.name}; {len(prompt_pairs)} {dataset} pairs", markup=False)
    run = measure_faithfulness(
        lm, prompt_pairs, families=families, methods=chosen_methods, metric=metric, rules=relp_rules,
        window=window, max_rows=max_rows, ig_steps=ig_steps, progress=True,
        log=lambda m: err_console.print(m, markup=False),
    )  # fmt: skip
    name = Path(dataset).stem if dataset not in ("ioi", "capitals") else dataset
    result = PatchingResult.from_run(run, model=lm.name, architecture=lm.arch.family, dataset=name)
    if out is None:
        out_dir = out_dir / safe_name(lm.name) / name
    paths = result.save(out_dir)
    _print_table(result)
    console.print(f"wrote {len(paths)} files to {out_dir} in {time.perf_counter() - started:.0f} s")


def _rule_set(text: str) -> RelpRules:
    """``none`` -> no rule (AtP), else the rules named, separated by ``,`` or ``+``."""
    from residlab.analyses.patching.relp import RelpRules

    if text.strip() == "default":
        raise ResidlabError(
            "'default' names no rule set inside --rules groups.",
            hint="leave the families out of every group to keep the model family's defaults.",
        )
    chosen = [] if text.strip() == "none" else _names(text.replace("+", ","), RULES, "RelP rule")
    return RelpRules(**{r: r in chosen for r in RULES})


def _rules(text: str) -> RelpRules | FamilyRules | None:
    """``default`` -> None (the family's default); one rule set for every family; or groups
    ``FAMILIES=RULES`` separated by ``;`` (one part without ``=`` sets the rules of every family not
    named; without it those keep the model family's defaults)."""
    from residlab.analyses.patching.relp_defaults import FamilyRules
    from residlab.analyses.patching.sites import FAMILIES

    if text.strip() == "default":
        return None
    if "=" not in text and ";" not in text:
        return _rule_set(text)
    parts = [p.strip() for p in text.split(";") if p.strip()]
    defaults = [p for p in parts if "=" not in p]
    if len(defaults) > 1:
        raise ResidlabError(
            f"--rules sets the other families' rules twice: {', '.join(defaults)}.",
            hint="give at most one part without '=' (e.g. 'attn,heads=norm+activation;norm+activation+attention').",
        )
    groups = []
    for part in (p for p in parts if "=" in p):
        families, rules = part.split("=", 1)
        groups.append((tuple(_names(families, tuple(FAMILIES), "site family")), _rule_set(rules)))
    return FamilyRules(_rule_set(defaults[0]) if defaults else None, tuple(groups))


def _print_table(result: PatchingResult) -> None:
    table = Table(title=f"{result.model} / {result.dataset}: estimates against exact patching")
    for column in ("family", "sites", "r AtP", "r RelP", "rho AtP", "rho RelP", "s exact", "s AtP", "s RelP"):
        table.add_column(column)
    for fam in result.families:
        table.add_row(
            fam.family, str(fam.num_sites),
            *(f"{fam.pearson[m]:.3f}" if m in fam.pearson else "-" for m in ("atp", "relp")),
            *(f"{fam.spearman[m]:.3f}" if m in fam.spearman else "-" for m in ("atp", "relp")),
            *(f"{fam.seconds[m]:.2f}" if m in fam.seconds else "-" for m in ("exact", "atp", "relp")),
        )  # fmt: skip
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``residlab patch`` to the top-level app."""
    app.command("patch")(patch)
