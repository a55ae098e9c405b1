"""Residual-stream analyses built on residlab's record / edit machinery.

- :func:`analyze_depth`: per-layer contributions, the effect of skipping each layer on later layers
  and on the output, and the logit lens (Csordas et al. 2025).
- :func:`analyze_sparsity`: lazy-neuron nonzero fractions, CETT and PPL-p% sparsity (Sparsing Law),
  temporal sparsity.
- :func:`analyze_dims`: hidden-dimension concentration (MoHD).
- :func:`logit_lens`, :func:`top_tokens`: read states or steering directions through the model's head.

Each analysis takes a loaded :class:`~residlab.LanguageModel` and a list of texts (see
:func:`read_texts`) and returns a result with ``summary()``, ``to_dict()``, ``plot(out_dir)`` and
``save(out_dir)``, all but ``summary`` from :class:`~residlab.analyses.result.AnalysisResult`, the base a
new analysis's result builds on (it declares its fields, ``summary()`` and its ``@figure`` methods).
"""

from residlab.analyses.depth import DepthResult, analyze_depth
from residlab.analyses.dims import DimsResult, analyze_dims
from residlab.analyses.lens import lens_log_probs, logit_lens, top_tokens
from residlab.analyses.result import AnalysisResult, figure
from residlab.analyses.sparsity import CETTCurve, SparsityResult, analyze_sparsity, bisect_increasing, cett
from residlab.data.texts import read_texts

__all__ = [
    "AnalysisResult",
    "CETTCurve",
    "DepthResult",
    "DimsResult",
    "SparsityResult",
    "analyze_depth",
    "analyze_dims",
    "analyze_sparsity",
    "bisect_increasing",
    "cett",
    "figure",
    "lens_log_probs",
    "logit_lens",
    "read_texts",
    "top_tokens",
]
