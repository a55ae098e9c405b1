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
