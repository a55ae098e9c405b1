"""Steering recipes built on a loaded model: contrastive extraction of a vector from two sets of
completions with pluggable aggregators and a cross-validated separation per layer (``extraction``), and the
KL-bound strength calibration with the KL actually measured (``calibration``)."""
