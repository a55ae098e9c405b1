"""The guidance experiment: a small network trained from scratch on real text, with and without CKA guidance
from a packaged model's layers, same steps, same data order and same seeds.

- **Data**: the corpus's *train* documents (shuffled with a fixed seed) tokenised with the guide's
  tokenizer into windows of ``seq_len`` tokens; evaluation windows come from its held-out *eval*
  documents. The target predicts the ``vocab`` most frequent train tokens plus one "other" class
  (the guide's 49k-token head would dominate a CPU-sized model); the coverage is reported.
- **Guide**: the packaged model's block outputs at the layers the even-stride mapping picks, computed
  once and cached (float16) under the cache dir; ``guided_untrained`` uses the same architecture
  freshly initialised (the paper's "untrained guide", which transfers only the architectural prior).
- **Runs**: each (condition, seed) starts from the same initial weights and batch order for that
  seed; the held-out cross-entropy and the CKA of each target layer with its guide layer (biased
  and debiased, against the *trained* guide for every condition, so curves compare) are measured
  every ``eval_every`` steps. Position 0 of every window is left out of every CKA (the guide's
  attention sink). Each finished run is written to ``work_dir/runs/`` and reused: an interrupted
  experiment resumes at the first unfinished run.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from residlab.analyses.cka_math import CkaAccumulator, even_stride_mapping
from residlab.analyses.common import TokenBatch, run_decoder
from residlab.analyses.guidance import CkaGuidanceLoss
from residlab.analyses.guidance_result import GuidanceResult, RunCurve
from residlab.analyses.guidance_targets import TARGETS
from residlab.core.errors import ResidlabError
from residlab.core.io import write_json
from residlab.core.types import Log

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel

GUIDE_OF = {"baseline": None, "guided": "trained", "guided_untrained": "untrained"}  # condition -> guide
CONDITIONS = tuple(GUIDE_OF)


@dataclass(frozen=True)
class GuidanceConfig:
    """Everything that defines one guidance experiment."""

    target: str = "rnn"
    guide: str = "smollm2-135m-instruct"
    corpus: str = "wiki"
    seq_len: int = 64
    train_windows: int = 1024
    eval_windows: int = 64
    vocab: int = 2048
    width: int = 128
    layers: int = 3
    steps: int = 500
    batch_size: int = 16
    lr: float = 2e-3
    weight: float = 1.0
    debiased: bool = False
    eval_every: int = 25
    seeds: tuple[int, ...] = (0, 1, 2)
    conditions: tuple[str, ...] = ("baseline", "guided")

    def check(self) -> None:
        """Refuse settings that cannot run, with a hint."""
        if self.target not in TARGETS:
            raise ResidlabError(f"unknown target {self.target!r}.", hint=f"use one of {', '.join(TARGETS)}.")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad or not self.conditions:
            raise ResidlabError(f"unknown condition(s) {bad}.", hint=f"use some of {', '.join(CONDITIONS)}.")
        small = {k: getattr(self, k) for k in ("train_windows", "eval_windows", "steps", "eval_every", "layers")}
        if min(small.values()) < 1 or self.seq_len < 8 or self.batch_size < 2 or self.vocab < 2 or not self.seeds:
            raise ResidlabError(
                "the guidance experiment needs windows, steps, layers >= 1, seq_len >= 8, batch >= 2 and a seed.",
                hint=f"got {small}, seq_len {self.seq_len}, batch {self.batch_size}, seeds {self.seeds}.",
            )

    def data_key(self) -> str:
        """A hash of what the windows and the guide states depend on."""
        keys = ("guide", "corpus", "seq_len", "train_windows", "eval_windows", "vocab", "layers")
        return hashlib.sha256(json.dumps([getattr(self, k) for k in keys]).encode()).hexdigest()[:16]

    def run_key(self) -> str:
        """A hash of the whole config but the seed and condition lists (a finished run is reused under it)."""
        payload = {k: v for k, v in asdict(self).items() if k not in ("seeds", "conditions")}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GuidanceData:
    """Token windows (guide ids and the target's labels) for training and held-out evaluation."""

    train_ids: torch.Tensor
    eval_ids: torch.Tensor
    train_labels: torch.Tensor
    eval_labels: torch.Tensor
    eval_coverage: float  # fraction of eval tokens inside the target's vocabulary
    guide_layers: list[int] = field(default_factory=list)


def _windows(lm: LanguageModel, docs: tuple[str, ...], count: int, seq_len: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``seq_len`` tokens cut from the shuffled documents joined by EOS."""
    order = list(docs)
    random.Random(seed).shuffle(order)
    eos = lm.eos_token_ids[0] if lm.eos_token_ids else lm.pad_token_id
    stream: list[int] = []
    for doc in order:
        stream += list(lm.tokenizer(doc, add_special_tokens=False)["input_ids"]) + [eos]
        if len(stream) >= count * seq_len:
            break
    if len(stream) < count * seq_len:
        raise ResidlabError(
            f"the corpus gives {len(stream)} tokens, fewer than {count} windows of {seq_len}.",
            hint="ask for fewer windows or a shorter --seq-len.",
        )
    return torch.tensor(stream[: count * seq_len]).view(count, seq_len)


def prepare_data(lm: LanguageModel, cfg: GuidanceConfig) -> GuidanceData:
    """Train and eval windows from the corpus and the target's vocabulary (top train tokens + other)."""
    from residlab.data.corpus import load_corpus

    corpus = load_corpus(cfg.corpus)
    train = _windows(lm, corpus.split("train"), cfg.train_windows, cfg.seq_len, seed=0)
    held = _windows(lm, corpus.split("eval"), cfg.eval_windows, cfg.seq_len, seed=0)
    frequent = [t for t, _ in Counter(train.flatten().tolist()).most_common(cfg.vocab)]
    table = torch.full((max(int(train.max()), int(held.max()), *frequent) + 1,), len(frequent), dtype=torch.long)
    table[torch.tensor(frequent)] = torch.arange(len(frequent))
    eval_labels = table[held]
    return GuidanceData(
        train_ids=train,
        eval_ids=held,
        train_labels=table[train],
        eval_labels=eval_labels,
        eval_coverage=float((eval_labels < len(frequent)).float().mean()),
        guide_layers=even_stride_mapping(cfg.layers, lm.num_layers),
    )


@torch.inference_mode()
def guide_states(
    lm: LanguageModel, ids: torch.Tensor, layers: list[int], cache: Path | None, batch_size: int = 16
) -> torch.Tensor:
    """[len(layers), windows, seq_len, d] float16 block outputs of ``lm`` on ``ids``, cached at ``cache``."""
    from tqdm.auto import tqdm

    if cache is not None and cache.is_file():
        stored = torch.load(cache, weights_only=True)
        if tuple(stored.shape[:3]) == (len(layers), *ids.shape):
            return stored
    out = torch.empty(len(layers), *ids.shape, lm.hidden_size, dtype=torch.float16)
    for start in tqdm(range(0, ids.shape[0], batch_size), desc=f"guide {lm.name}", unit="batch"):
        rows = ids[start : start + batch_size].tolist()
        with lm.record(layers, positions="all") as rec:
            run_decoder(lm, TokenBatch(tuple(range(len(rows))), lm.pad(rows)))
        for i, layer in enumerate(layers):
            out[i, start : start + len(rows)] = rec[layer, "block"].to(torch.float16)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(cache)
    return out


@torch.no_grad()
def _evaluate(
    model: torch.nn.Module, data: GuidanceData, guide_eval: torch.Tensor, batch_size: int
) -> tuple[float, list[float], list[float]]:
    """Held-out CE and each layer's CKA (biased, debiased) with its guide layer, positions >= 1."""
    model.eval()
    total, count = 0.0, 0
    layers = guide_eval.shape[0]
    acc = CkaAccumulator(layers, layers)
    for start in range(0, data.eval_ids.shape[0], batch_size):
        labels = data.eval_labels[start : start + batch_size]
        logits, states = model(labels)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        total, count = total + float(ce), count + labels[:, 1:].numel()
        mine = torch.stack([s[:, 1:].flatten(0, 1) for s in states])
        theirs = guide_eval[:, start : start + batch_size, 1:].flatten(1, 2).float()
        acc.add(mine, theirs)
    model.train()
    cka = acc.result()
    return total / count, [cka.biased[i][i] for i in range(layers)], [cka.debiased[i][i] for i in range(layers)]


def train_run(
    cfg: GuidanceConfig,
    data: GuidanceData,
    condition: str,
    seed: int,
    guide_train: torch.Tensor | None,
    guide_eval: torch.Tensor,
    bar: Any = None,
) -> RunCurve:
    """Train one target from scratch (``guide_train`` None = no guidance) and trace its held-out curves."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = TARGETS[cfg.target](cfg.vocab + 1, cfg.width, cfg.layers, cfg.seq_len)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    guidance = CkaGuidanceLoss(dict(enumerate(range(cfg.layers))), weight=cfg.weight, debiased=cfg.debiased)
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(cfg.train_windows, generator=generator) for _ in range(cfg.steps)])
    mask = torch.ones(cfg.batch_size, cfg.seq_len, dtype=torch.bool)
    mask[:, 0] = False
    curve = RunCurve.start(condition, seed, *_evaluate(model, data, guide_eval, cfg.batch_size))
    task_sum, guide_sum, seen = 0.0, 0.0, 0
    for step in range(1, cfg.steps + 1):
        index = order[(step - 1) * cfg.batch_size : step * cfg.batch_size]
        labels = data.train_labels[index]
        logits, states = model(labels)
        task = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        loss = task
        if guide_train is not None:
            term = guidance(states, guide_train[:, index].float(), mask[: len(index)])
            loss = task + term
            guide_sum += float(term.detach())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        task_sum, seen = task_sum + float(task.detach()), seen + 1
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.add(step, task_sum / seen, guide_sum / seen, *_evaluate(model, data, guide_eval, cfg.batch_size))
            task_sum, guide_sum, seen = 0.0, 0.0, 0
        if bar is not None:
            bar.update()
    return curve.finished(time.perf_counter() - started)


def _guides(
    lm: LanguageModel, cfg: GuidanceConfig, data: GuidanceData, log: Log
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(train, eval) guide states of the trained guide, and of the untrained one when a condition needs it."""
    from residlab.analyses.criticality import fresh_copy
    from residlab.core.cache import cache_dir

    folder = cache_dir() / "guidance" / cfg.data_key()
    guides = {}
    for name, model in (("trained", lm), ("untrained", None)):
        if name == "untrained" and "guided_untrained" not in cfg.conditions:
            continue
        model = model or fresh_copy(lm, seed=0)
        log(f"guide states ({name}): layers {data.guide_layers} of {lm.name}")
        guides[name] = (
            guide_states(model, data.train_ids, data.guide_layers, folder / f"{name}-train.pt"),
            guide_states(model, data.eval_ids, data.guide_layers, folder / f"{name}-eval.pt"),
        )
    return guides


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads (None: unchanged), restoring the setting after."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_guidance_experiment(
    lm: LanguageModel,
    cfg: GuidanceConfig,
    work_dir: str | Path,
    *,
    train_threads: int | None = 1,
    log: Log | None = None,
    progress: bool = True,
) -> GuidanceResult:
    """Every (condition, seed) run of ``cfg`` with ``lm`` as the guide; finished runs are reused from ``work_dir``.

    The small target's many small operations train fastest on ``train_threads`` threads (1 by default:
    on a busy 2-core machine two threads spin against each other and ran 10-40x slower, measured).
    """
    from tqdm.auto import tqdm

    cfg.check()
    log = log or (lambda message: None)
    torch.manual_seed(0)
    data = prepare_data(lm, cfg)
    guides = _guides(lm, cfg, data, log)
    runs_dir = Path(work_dir) / "runs" / cfg.run_key()
    runs = []
    bar = tqdm(total=cfg.steps * len(cfg.seeds) * len(cfg.conditions), unit="step", disable=not progress, desc="train")
    for seed in cfg.seeds:
        for condition in cfg.conditions:
            path = runs_dir / f"{condition}-seed{seed}.json"
            if path.is_file():
                runs.append(RunCurve.from_dict(json.loads(path.read_text())))
                bar.update(cfg.steps)
                log(f"reused {path}")
                continue
            source = GUIDE_OF[condition]
            guide_train = None if source is None else guides[source][0]
            with _threads(train_threads):
                curve = train_run(cfg, data, condition, seed, guide_train, guides["trained"][1], bar)
            write_json(path, asdict(curve))
            runs.append(curve)
            log(f"{condition} seed {seed}: held-out CE {curve.eval_ce[-1]:.4f} ({curve.seconds:.0f} s)")
    bar.close()
    return GuidanceResult(
        config=asdict(cfg),
        guide=lm.name,
        guide_layers=data.guide_layers,
        train_tokens=int(data.train_ids.numel()),
        eval_tokens=int(data.eval_ids.numel()),
        eval_coverage=data.eval_coverage,
        runs=runs,
    )
