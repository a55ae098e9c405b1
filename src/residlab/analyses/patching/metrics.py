"""What a patched run is scored by: a small registry of metrics on the last position's logits.

Every metric returns one value per row, higher = more like the clean run, so a patching effect
``metric(patched) - metric(corrupted)`` is positive when the patch restores clean behaviour:

- ``logit_diff`` (default): logit of the clean answer minus logit of the wrong (corrupted) answer;
- ``probability``: the clean answer's probability;
- ``kl``: minus the KL divergence from the clean run's next-token distribution, KL(p_clean || p).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from residlab.core.registry import lookup


@dataclass(frozen=True)
class MetricTargets:
    """What the metrics compare a run with, one row per scored row."""

    answer: torch.Tensor  # [rows] token ids
    wrong: torch.Tensor  # [rows] token ids
    clean_logprobs: torch.Tensor  # [rows, vocab] the clean run's last-position log-probabilities

    def repeat_interleave(self, times: int) -> MetricTargets:
        """The targets for each row repeated ``times`` times in place (row = pair * times + copy)."""
        return MetricTargets(
            self.answer.repeat_interleave(times),
            self.wrong.repeat_interleave(times),
            self.clean_logprobs.repeat_interleave(times, 0),
        )


Metric = Callable[[torch.Tensor, MetricTargets], torch.Tensor]  # (last logits [rows, vocab], targets) -> [rows]


def logit_diff(logits: torch.Tensor, targets: MetricTargets) -> torch.Tensor:
    """logit[answer] - logit[wrong]."""
    logits = logits.float()
    return logits.gather(1, targets.answer[:, None])[:, 0] - logits.gather(1, targets.wrong[:, None])[:, 0]


def probability(logits: torch.Tensor, targets: MetricTargets) -> torch.Tensor:
    """The clean answer's softmax probability."""
    return logits.float().softmax(-1).gather(1, targets.answer[:, None])[:, 0]


def negative_kl(logits: torch.Tensor, targets: MetricTargets) -> torch.Tensor:
    """-KL(p_clean || p_run): 0 when the run predicts exactly as the clean run."""
    logprobs = logits.float().log_softmax(-1)
    clean = targets.clean_logprobs.float()
    return -(clean.exp() * (clean - logprobs)).sum(-1)


METRICS: dict[str, Metric] = {"logit_diff": logit_diff, "probability": probability, "kl": negative_kl}


def get_metric(name: str | Metric) -> Metric:
    """A metric by name (or a callable ``(logits, targets) -> [rows]`` itself)."""
    return lookup(METRICS, name, what="patching metric", extend_hint="pass a callable (logits, targets) -> [rows]")


def metric_name(metric: str | Metric) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
