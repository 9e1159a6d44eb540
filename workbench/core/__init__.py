"""The quantization math of the seed: schemes, qparams, (fake) quantization, observers.

Torch only; knows nothing of models.
"""

from workbench.core.fake_quant import fake_quantize, fake_quantize_learned_scale
from workbench.core.observers import (
    OBSERVER_NAMES,
    Observer,
    make_observer,
    weight_range_mse,
)
from workbench.core.qparams import check_finite, qparams_from_range
from workbench.core.qtensor import (
    QTensor,
    dequantize_with,
    quantize_tensor,
    quantize_with,
)
from workbench.core.scheme import Scheme

__all__ = [
    "OBSERVER_NAMES",
    "Observer",
    "QTensor",
    "Scheme",
    "check_finite",
    "dequantize_with",
    "fake_quantize",
    "fake_quantize_learned_scale",
    "make_observer",
    "qparams_from_range",
    "quantize_tensor",
    "quantize_with",
    "weight_range_mse",
]
