"""Which components cause a behaviour: exact activation patching and its gradient estimates.

One idea per module:

- ``pairs``: prompt pairs tokenised into one left-padded batch (:class:`PairBatch`);
- ``metrics``: what a run is scored by (logit difference, answer probability, KL to the clean run);
- ``sites``: what is patched (residual stream, attention / MLP outputs per layer x position, heads,
  MLP neurons; windows of layers);
- ``activations``: running the model and reading every site's activation, with or without gradients;
- ``exact``: batched exact patching (one batch row per patched site and pair) and ablations;
- ``attribution``: AtP, and RelP with the LRP rules of ``relp`` (norms, activations, gated products)
  and ``relp_attention`` (the attention pattern detached through transformers' AttentionInterface);
- ``faithfulness``: estimates against exact patching (Pearson, Spearman, wall-clock), with figures
  and a report.
"""

from residlab.analyses.patching.ablation import ABLATIONS, ablation_sources
from residlab.analyses.patching.attribution import Attribution, attribute, estimated_effects
from residlab.analyses.patching.exact import PatchRun, exact_effects
from residlab.analyses.patching.faithfulness import Faithfulness, measure_faithfulness
from residlab.analyses.patching.metrics import METRICS, MetricTargets, get_metric
from residlab.analyses.patching.pairs import PairBatch, encode_pairs
from residlab.analyses.patching.relp import RelpRules, relp_rules
from residlab.analyses.patching.report import PatchingResult
from residlab.analyses.patching.sites import FAMILIES, PatchSite, site_grid

__all__ = [
    "ABLATIONS",
    "FAMILIES",
    "METRICS",
    "Attribution",
    "Faithfulness",
    "MetricTargets",
    "PairBatch",
    "PatchRun",
    "PatchSite",
    "PatchingResult",
    "RelpRules",
    "ablation_sources",
    "attribute",
    "encode_pairs",
    "estimated_effects",
    "exact_effects",
    "get_metric",
    "measure_faithfulness",
    "relp_rules",
    "site_grid",
]
