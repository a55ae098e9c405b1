"""Residual-stream analyses built on residlab's record / edit machinery.

- :func:`analyze_depth`: per-layer contributions, the effect of skipping each layer on later layers
  and on the output, and the logit lens (Csordas et al. 2025).
- :func:`analyze_sparsity`: lazy-neuron nonzero fractions, CETT and PPL-p% sparsity (Sparsing Law),
  temporal sparsity.
- :func:`analyze_dims`: hidden-dimension concentration (MoHD).
- :func:`logit_lens`, :func:`top_tokens`: read states or steering directions through the model's head.
- :func:`analyze_cka`, :func:`linear_cka`: layer x layer linear CKA (biased and debiased), within a model
  or between two; :class:`CkaGuidanceLoss`: the guidance loss of "Training the Untrainable"
  (:mod:`residlab.analyses.guidance_experiment` runs the guided-training experiment).
- :func:`analyze_residual`: branch/skip ratios, norm growth, inference-time residual scaling sweeps.
- :func:`analyze_criticality`: depth profiles of the trained model and of its architecture at init.

Each analysis takes a loaded :class:`~residlab.LanguageModel` and a list of texts (see
:func:`read_texts`) and returns a result with ``summary()``, ``to_dict()``, ``plot(out_dir)`` and
``save(out_dir)``, all but ``summary`` from :class:`~residlab.analyses.result.AnalysisResult`, the base a
new analysis's result builds on (it declares its fields, ``summary()`` and its ``@figure`` methods).
"""

from residlab.analyses.cka import CkaResult, analyze_cka
from residlab.analyses.cka_math import linear_cka
from residlab.analyses.criticality import CriticalityResult, analyze_criticality
from residlab.analyses.depth import DepthResult, analyze_depth
from residlab.analyses.dims import DimsResult, analyze_dims
from residlab.analyses.guidance import CkaGuidanceLoss
from residlab.analyses.lens import lens_log_probs, logit_lens, top_tokens
from residlab.analyses.residual_scaling import ResidualResult, analyze_residual
from residlab.analyses.result import AnalysisResult, figure
from residlab.analyses.sparsity import CETTCurve, SparsityResult, analyze_sparsity, bisect_increasing, cett
from residlab.data.texts import read_texts

__all__ = [
    "AnalysisResult",
    "CETTCurve",
    "CkaGuidanceLoss",
    "CkaResult",
    "CriticalityResult",
    "DepthResult",
    "DimsResult",
    "ResidualResult",
    "SparsityResult",
    "analyze_cka",
    "analyze_criticality",
    "analyze_depth",
    "analyze_dims",
    "analyze_residual",
    "analyze_sparsity",
    "bisect_increasing",
    "cett",
    "figure",
    "lens_log_probs",
    "linear_cka",
    "logit_lens",
    "read_texts",
    "top_tokens",
]
