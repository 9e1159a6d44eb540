"""Quantizer modules placed into the model: one for an activation, one for a weight."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from workbench.core.fake_quant import fake_quantize, fake_quantize_learned_scale
from workbench.core.observers import Observer, make_observer, weight_range_mse
from workbench.core.qparams import qparams_from_range
from workbench.core.qtensor import tensor_range
from workbench.core.scheme import Scheme
from workbench.core.weight_codes import WeightCodes, row_block, weight_codes
from workbench.engine.capture.modules import find_submodule

OFF, OBSERVE, QUANTIZE = "off", "observe", "quantize"
# a Linear weight this large is dequantized a block of rows at a time in the forward pass
BLOCKED_LINEAR_ELEMENTS = 1 << 24
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

    dynamic = False  # True: qparams from each input (engine.quantizers.dynamic)

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


def linear_from_codes(
    x: torch.Tensor, codes: WeightCodes, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``F.linear(x, codes.dequantize(), bias)`` with one block of output rows dequantized at a
    time (about ``BLOCKED_LINEAR_ELEMENTS / 4`` weights each); None where the codes cannot be
    cut into row blocks."""
    rows, columns = codes.shape
    step = max(2, BLOCKED_LINEAR_ELEMENTS // 4 // columns // 2 * 2)  # even: whole bytes
    starts = range(0, rows, step)
    blocks = [row_block(codes, start, min(start + step, rows)) for start in starts]
    if any(block is None for block in blocks):
        return None
    out = x.new_empty((*x.shape[:-1], rows))
    for start, block in zip(starts, blocks, strict=True):
        end = start + block.shape[0]
        part_bias = None if bias is None else bias[start:end]
        out[..., start:end] = F.linear(x, block.dequantize(), part_bias)
    return out


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight; qparams come from the weight itself (minmax or MSE search).

    During PTQ the qparams are computed once (``freeze``). During QAT they follow the weight
    (recomputed every step) unless the scale is learned.

    Once frozen, the weight's integer codes are computed once and kept (``codes_of``, compact:
    ``core.weight_codes``); a forward pass dequantizes them instead of fake-quantizing the
    FP32 weight again. They are computed anew when the weight is another tensor or was
    changed in place (its version counter), and not used where a gradient must reach the
    weight (QAT's steps): there the fake quantization runs as before.
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
        self._drop_codes()

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
        self._drop_codes()

    # the kept codes ---------------------------------------------------------------------------
    def _drop_codes(self) -> None:
        self.release_dequantized()
        self._codes: WeightCodes | None = None
        self._codes_key: tuple | None = None
        self._codes_of: weakref.ref | None = None

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        # weakref: not picklable; the codes are computed again
        state.update(_codes=None, _codes_key=None, _codes_of=None, _held=None)
        return state

    hold_dequantized = False  # keep the last dequantized weight for the next call

    def release_dequantized(self) -> None:
        """Drop the dequantized weight kept by ``hold_dequantized`` (its FP32 memory)."""
        self._held: tuple[WeightCodes, torch.Tensor] | None = None
        self.hold_dequantized = False

    def share_kept_state_of(self, source: WeightQuantizer) -> None:
        """Use ``source``'s kept codes (``modules.shared_copy``: the weight is the same)."""
        self._codes, self._codes_key, self._codes_of = (
            source._codes,
            source._codes_key,
            source._codes_of,
        )

    def _codes_current(self, weight: torch.Tensor) -> bool:
        """The kept codes are of this very weight, unchanged, with the current qparams."""
        codes = self._codes
        return (
            codes is not None
            and self._codes_of is not None
            and self._codes_of() is weight
            and self._codes_key == _codes_key(weight, codes)
            and codes.scale.shape == self.scale.shape
            and torch.equal(codes.scale, self.scale)
            and torch.equal(codes.zero_point.to(self.zero_point.dtype), self.zero_point)
        )

    def uses_codes(self, weight: torch.Tensor) -> bool:
        """Whether a forward pass reads the kept codes: frozen fixed qparams, a float32
        weight, and no gradient to carry to it."""
        return (
            self.frozen
            and not self.learn_scale
            and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and weight.requires_grad)
        )

    def codes_of(self, weight: torch.Tensor) -> WeightCodes:
        """The integer codes of ``weight`` for the frozen qparams, computed once per weight
        (again when it is another tensor or was modified in place)."""
        if not self.frozen:
            self.freeze(weight)
        if not self._codes_current(weight):
            scale, zero_point = self.qparams(weight)
            # the codes hold this quantizer's own qparams (no copies); their version counters
            # in the key tell a change in place (``load_state_dict``) from none
            self._codes = weight_codes(weight, scale, zero_point, self.scheme, copy_qparams=False)
            self._codes_of = weakref.ref(weight)
            self._codes_key = _codes_key(weight, self._codes)
        return self._codes

    def linear_in_blocks(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``F.linear(x, Q(W), b)`` for a weight of ``BLOCKED_LINEAR_ELEMENTS`` or more read
        from its kept codes, dequantizing one block of output rows at a time (an LM head's
        FP32 copy is never whole; the same values up to the order of float sums); None where
        it does not apply (the plain path runs)."""
        if (
            weight.numel() < BLOCKED_LINEAR_ELEMENTS
            or weight.dim() != 2
            or not self.enabled
            or type(self).forward is not WeightQuantizer.forward
            or not self.uses_codes(weight)
            or torch.is_grad_enabled()
        ):
            return None
        return linear_from_codes(x, self.codes_of(weight), bias)

    def exact_codes(self, weight: torch.Tensor) -> WeightCodes | None:
        """The codes whose dequantization is what the forward pass returns for ``weight``
        (None where it computes something else: not frozen, a learned scale, a subclass with
        its own rounding)."""
        if (
            not self.enabled
            or not self.frozen
            or self.learn_scale
            or type(self).forward is not WeightQuantizer.forward
            or weight.dtype != torch.float32
        ):
            return None
        return self.codes_of(weight)

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
        if self.uses_codes(weight):
            codes = self.codes_of(weight)
            held = self._held
            if held is not None and held[0] is codes:
                return held[1]
            value = codes.dequantize()
            if self.hold_dequantized:  # reused by the next call until released
                self._held = (codes, value)
            return value
        scale, zero_point = self.qparams(weight)
        if self.learn_scale:
            return fake_quantize_learned_scale(weight, scale, zero_point, self.scheme)
        return fake_quantize(weight, scale, zero_point, self.scheme)

    def extra_repr(self) -> str:
        return f"{self.scheme.describe()}, observer={self.observer_name}"


def _codes_key(weight: torch.Tensor, codes: WeightCodes) -> tuple[int, ...]:
    """What kept codes were computed from, as version counters and the weight's address: a
    change in place of the weight or of the qparams the codes hold changes it."""
    versions = (weight._version, codes.scale._version, codes.zero_point._version)
    return (*versions, weight.data_ptr())


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
