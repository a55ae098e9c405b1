"""Train-split probe (issue 14): the announced plan, and whether steering can drop it for free.

The default model opens most answers with a plan ("we need to follow these steps:" and a numbered list)
that it then carries out step by step; on the 200 test problems the plan is 12% of the baseline's
tokens and 16% of the learned ASC vector's, and every trained vector keeps it. This probe asks:

1. does an instruction not to list the steps in advance remove it (a prompt, no steering);
2. does a vector trained on the plan decision remove it, and at what accuracy: the learned method
   (``recipes.learned_vector``) on ``prune`` pairs (the model's own correct trace with and without
   its plan and units), over only the first ``--window`` completion tokens (where the plan is decided),
   ``--steps`` steps of ``--pairs-per-step`` pairs at ``--lr``, from the ``--start`` vector (the
   ``learned-prune-prose`` vector of ``benchmarks/asc_methods.py``), then steered at its trained norm
   and at ``--strengths``.

GSM8K train problems ``--offset``.. (past the pair problems), greedy, 512 new tokens, batch 8, torch
bfloat16; results in ``benchmarks/results/asc_plan_probe_train.md``. Everything is cached under
``--work-dir`` (records, the verbose traces of the pair problems, the learning checkpoint).
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
NO_PLAN = (
    "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}. "
    "Do not list the steps in advance: start with the first calculation."
)
PLAN = re.compile(r"follow these steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--start", required=True, help="one-layer vector to start from (asc_methods' concise.safetensors)"
    )
    parser.add_argument("--work-dir", default="residlab-out/asc-plan-probe")
    parser.add_argument("--pairs", type=int, default=96, help="GSM8K train problems for prune pairs")
    parser.add_argument("--window", type=int, default=48, help="completion tokens the preference loss sees")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--pairs-per-step", type=int, default=2)
    parser.add_argument("--strengths", default="5.5,6.5", help="besides the trained norm, on the unit vector")
    parser.add_argument("--offset", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=40)
    args = parser.parse_args()

    from residlab.data import load_problems
    from residlab.data.corpus import load_corpus
    from residlab.evaluation.report import summarize
    from residlab.evaluation.runner import Condition, Decoding, evaluate
    from residlab.evaluation.stats import mcnemar_exact
    from residlab.methods.asc import prompts
    from residlab.methods.asc.pairs import build_pairs
    from residlab.models.loading import load
    from residlab.recipes.learned_vector import LearnSettings, PreferencePair, learn_vector
    from residlab.vectors.steering_vector import SteeringVector

    work = Path(args.work_dir)
    start = SteeringVector.load(args.start)
    if len(start.layers) != 1:
        parser.error(f"--start must be one layer (compress writes concise.safetensors); it has layers {start.layers}")
    (layer,) = start.layers
    lm = load(start.model_name, dtype="bfloat16")
    decoding = Decoding(max_new_tokens=512, batch_size=8)
    pairs, _ = build_pairs(
        lm,
        load_problems("gsm8k", "train", limit=args.pairs),
        source="prune",
        work_dir=work / "pairs",
        decoding=decoding,
        keep="concise_correct",
    )
    chat = lm.has_chat_template
    preference = [
        PreferencePair(lm.format_prompt(prompts.VERBOSE.format(question=p.question), chat=chat), p.concise, p.verbose)
        for p in pairs
    ]
    general = [t for t in load_corpus("wiki").split("train") if t.strip()][: max(8, args.steps)]
    settings = LearnSettings(
        layer=layer,
        steps=args.steps,
        learning_rate=args.lr,
        pairs_per_step=args.pairs_per_step,
        max_completion_tokens=args.window,
    )
    # A saved ASC vector is a unit vector; the strength it was used at is in its metadata.
    start_strength = float(start.info.get("strength", start.norm(layer)))
    initial = start.directions[layer].float() / start.directions[layer].float().norm() * start_strength
    learned = learn_vector(
        lm, preference, general, initial, settings, checkpoint_dir=work / "learned", log=lambda m: print(m, flush=True)
    )
    unit = SteeringVector.from_tensor(learned.vector / learned.vector.norm(), model=lm, layer=layer, source="plan")
    strengths = [learned.norm, *(float(s) for s in args.strengths.split(",") if s)]

    problems = load_problems("gsm8k", "train", offset=args.offset, limit=args.limit)
    conditions = [
        Condition("baseline", prompts.VERBOSE),
        Condition("no-plan-prompt", NO_PLAN),
        *(Condition(f"plan-window-{s:.2f}", prompts.VERBOSE, vector=unit, strength=s) for s in strengths),
    ]
    runs = [(c, evaluate(lm, problems, c, decoding, work / "runs")) for c in conditions]
    base = runs[0][1]
    lines = [
        "# The announced plan on GSM8K train: prompt and plan-window vector (issue 14)",
        "",
        f"{start.model_name}, torch bfloat16, GSM8K train {args.offset}-{args.offset + args.limit - 1}, greedy, "
        f"512 new tokens, batch 8. Plan-window vector: {len(pairs)} prune pairs, layer {layer}, window "
        f"{args.window} tokens, {args.steps} steps x {args.pairs_per_step} pairs, lr {args.lr}, from `{args.start}` "
        f"(strength {start_strength:.2f}); trained norm {learned.norm:.2f}, cosine to the start "
        f"{learned.cosine_to_initial:.2f}. 'plan': answers that announce one ('follow these steps').",
        "",
        "| condition | accuracy (95% CI) | mean tokens | change | plan | lost / gained vs baseline | McNemar p |",
        "|---|---|---|---|---|---|---|",
    ]
    base_tokens = statistics.mean(r.tokens for r in base)
    for condition, records in runs:
        summary = summarize(condition.name, records)
        low, high = summary.accuracy_ci95
        lost = sum(b.correct and not r.correct for r, b in zip(records, base, strict=True))
        gained = sum(r.correct and not b.correct for r, b in zip(records, base, strict=True))
        plans = sum(bool(PLAN.search(r.output)) for r in records)
        lines.append(
            f"| {condition.name} | {summary.accuracy:.1%} ({low:.1%}-{high:.1%}) | {summary.mean_tokens:.0f} | "
            f"{summary.mean_tokens / base_tokens - 1:+.1%} | {plans}/{len(records)} | {lost} / {gained} | "
            f"{mcnemar_exact(lost, gained):.3f} |"
        )
    lines += [
        "",
        "Reproduce: the start vector is the `concise.safetensors` that `python benchmarks/asc_methods.py --split train "
        "--limit 40 --pairs 96 --methods learned-prune-prose --strength 0.5 --adaptive '' --prompt-baselines ''` "
        f"writes (here `{args.start}`); then `python benchmarks/asc_plan_probe.py --start <that file> --window "
        f"{args.window} --steps {args.steps} --lr {args.lr} --strengths {args.strengths}`",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "asc_plan_probe_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
