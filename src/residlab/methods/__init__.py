"""Methods: complete jobs built from the layers below. ``asc`` is Activation-Steered Compression (pairs ->
vector -> layer and strength -> calibration -> conditions -> report); ``sweep`` grids layers x strengths x
position rules on a tuning split."""
