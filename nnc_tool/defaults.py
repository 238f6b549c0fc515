"""Names and defaults of the user-facing settings, importable without numpy.

The CLI builds its options (choices, defaults, help) from these at start-up, before it knows which
command runs, so `nnc --help` does not import the quantizer; the modules that use them import them
from here.
"""
from __future__ import annotations

# Quantization (nnc_tool/quantize)
# Assumed correlation of horizontally or vertically adjacent inputs of a convolution kernel.
DEFAULT_KERNEL_CORRELATION = 0.3
# Beyond this the assumed tap correlation matrix is too close to singular to invert usefully.
MAX_KERNEL_CORRELATION = 0.95
CALIBRATION_MODES = ("auto", "full", "fast")
# calibration_mode "auto": models with more weight parameters than this use "fast"
# calibration when their sensitivity runs are costly (quantize/plan.fast_calibration). Digits ResNet-18 (11.2 M): "full" encodes in 4-5 s at BD-rate -33.6 % vs NNCodec,
# "fast" in about 0.7 s at -25 %; the sample models (under 0.2 M) take well under a second "full".
FULL_CALIBRATION_PARAMETERS = 2_000_000

# Pruning (nnc_tool/prune)
METHODS = ("unstructured", "nm", "structured", "depth")
SCOPES = ("layer", "global")
NM_GRANULARITIES = ("weight", "kernel")
IMPORTANCES = ("l1", "l2", "bn", "random", "activation", "shapley")
ALLOCATIONS = ("uniform", "global", "sensitivity")
