"""Quantizer modules placed into the model: one for an activation, one for a weight."""

from __future__ import annotations

import torch
from torch import nn

from workbench.core.fake_quant import fake_quantize, fake_quantize_learned_scale
from workbench.core.observers import Observer, make_observer, weight_range_mse
from workbench.core.qparams import qparams_from_range
from workbench.core.qtensor import tensor_range
from workbench.core.scheme import Scheme
from workbench.engine.modules import find_submodule

OFF, OBSERVE, QUANTIZE = "off", "observe", "quantize"
LEARNED_SCALE_FLOOR = 1e-12


def applied_scale(quantizer: ActivationQuantizer | WeightQuantizer) -> torch.Tensor:
    """The scale the forward pass applies: a learned (LSQ) scale enters as ``|s| + 1e-12``, so
    it stays positive whatever step the optimizer takes; a fixed scale as it is."""
    if quantizer.learn_scale:
        return quantizer.scale.abs() + LEARNED_SCALE_FLOOR
    return quantizer.scale


class ActivationQuantizer(nn.Module):
    """Observes an activation during calibration, then fake-quantizes it.

    Modes: ``off`` (pass-through), ``observe`` (pass-through, feed the observer),
    ``quantize`` (fake quantization with the calibrated scale / zero point).
    """

    dynamic = False  # True: qparams from each input (engine.dynamic_quantizers)

    def __init__(
        self, scheme: Scheme, observer: str, tensor_name: str, percentile: float = 99.99
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.tensor_name = tensor_name
        self.observer_name = observer
        self.percentile = percentile
        self.observer: Observer | None = make_observer(observer, scheme, tensor_name, percentile)
        self.mode = OFF
        self.learn_scale = False
        # path (below the model's root) of the quantizer whose scale / zero point this one
        # takes over after calibration: its input is already on that grid (graph_quantizers)
        self.shares_scale_of: str | None = None
        # the call site a quantizer placed outside layers sits at ("add#0"), matched by
        # QuantConfig.overrides, and what it quantizes ("add output"); empty on a layer's input
        self.site = ""
        self.site_kind = ""
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    def calibrate(self) -> None:
        """Turn the observed range into scale / zero point and drop the observer's histogram."""
        scale, zero_point = self.observer.compute_qparams()
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.observer = None

    @property
    def calibrated(self) -> bool:
        return self.observer is None

    def share_qparams_of(self, source: ActivationQuantizer) -> None:
        """Take ``source``'s scale and zero point: this quantizer's input is on its grid."""
        with torch.no_grad():
            self.scale.copy_(source.scale.reshape(self.scale.shape))
            self.zero_point.copy_(source.zero_point.reshape(self.zero_point.shape))

    def enable_learned_scale(self) -> None:
        """Make the scale an LSQ-trained parameter (QAT)."""
        _scale_to_parameter(self)

    def fix_learned_scale(self) -> None:
        """End of QAT: keep the learned scale as a fixed buffer (positive, as trained)."""
        _scale_to_buffer(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == OBSERVE:
            self.observer.update(x)
            return x
        if self.mode == QUANTIZE:
            if self.learn_scale:
                return fake_quantize_learned_scale(
                    x, applied_scale(self), self.zero_point, self.scheme
                )
            return fake_quantize(x, self.scale, self.zero_point, self.scheme)
        return x

    def extra_repr(self) -> str:
        return f"{self.scheme.describe()}, observer={self.observer_name}, mode={self.mode}"


def scale_source(model: nn.Module, quantizer: ActivationQuantizer) -> ActivationQuantizer | None:
    """The quantizer of ``model`` whose grid ``quantizer`` shares (``shares_scale_of``), if any."""
    path = quantizer.shares_scale_of
    source = find_submodule(model, path) if path else None
    return source if isinstance(source, ActivationQuantizer) else None


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight; qparams come from the weight itself (minmax or MSE search).

    During PTQ the qparams are computed once (``freeze``). During QAT they follow the weight
    (recomputed every step) unless the scale is learned.
    """

    def __init__(self, scheme: Scheme, observer: str = "minmax", tensor_name: str = "weight"):
        super().__init__()
        self.scheme = scheme
        self.observer_name = observer
        self.tensor_name = tensor_name
        self.enabled = True
        self.frozen = False
        self.learn_scale = False
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    def compute_qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight.detach().to(torch.float32)
        if self.observer_name == "mse":
            low, high = weight_range_mse(weight, self.scheme)
        else:
            low, high = tensor_range(weight, self.scheme)
        return qparams_from_range(low, high, self.scheme, self.tensor_name)

    def freeze(self, weight: torch.Tensor) -> None:
        scale, zero_point = self.compute_qparams(weight)
        self.scale = scale.clone()
        self.zero_point = zero_point.clone()
        self.frozen = True

    def enable_learned_scale(self, weight: torch.Tensor) -> None:
        """Make the (per-channel) scale an LSQ-trained parameter (QAT)."""
        if not self.frozen:
            self.freeze(weight)
        _scale_to_parameter(self)

    def fix_learned_scale(self) -> None:
        """End of QAT: keep the learned scale as a fixed (frozen) buffer, positive as trained."""
        if self.learn_scale:
            _scale_to_buffer(self)
            self.frozen = True

    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero point the forward pass applies to ``weight``."""
        if self.frozen or self.learn_scale:
            return applied_scale(self), self.zero_point
        return self.compute_qparams(weight)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        scale, zero_point = self.qparams(weight)
        if self.learn_scale:
            return fake_quantize_learned_scale(weight, scale, zero_point, self.scheme)
        return fake_quantize(weight, scale, zero_point, self.scheme)

    def extra_repr(self) -> str:
        return f"{self.scheme.describe()}, observer={self.observer_name}"


def _scale_to_parameter(quantizer: nn.Module) -> None:
    value = quantizer.scale.detach().clone()
    del quantizer.scale
    quantizer.scale = nn.Parameter(value)
    quantizer.learn_scale = True


def _scale_to_buffer(quantizer: nn.Module) -> None:
    if not quantizer.learn_scale:
        return
    value = applied_scale(quantizer).detach()  # the scale that was trained
    del quantizer.scale
    quantizer.register_buffer("scale", value)
    quantizer.learn_scale = False
