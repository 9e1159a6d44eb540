"""QuantConfig: what to quantize and how, plus the named presets."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from numbers import Real

from workbench.core.dynamic_quant import DYNAMIC_SCHEME
from workbench.core.observers import OBSERVER_NAMES
from workbench.core.scheme import Scheme
from workbench.engine.config_checks import exclude_patterns, override_table
from workbench.errors import ConfigError

WEIGHT_OBSERVER_NAMES = ("minmax", "mse")
WEIGHT_METHODS = ("nearest", "adaround", "gptq")  # how weights are rounded to their grid
WEIGHT_METHOD_ALIASES = {"rtn": "nearest"}  # round-to-nearest, as GPTQ's paper calls it
BIAS_CORRECTIONS = (False, True, "empirical", "analytic")
ACTIVATION_MODES = ("static", "dynamic")  # calibrated once / computed from each input


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized.

    Parameters
    ----------
    weight : Scheme
        Scheme of Linear / Conv weights (axis 0 = output channels when per-channel;
        ``group_size`` = block-wise scales along the inputs of Linear weights).
    activation : Scheme or None
        Scheme of the activations entering quantized layers; ``None`` = weight-only.
    activation_mode : str
        ``static`` (default): activation scales calibrated once and stored. ``dynamic``: each
        Linear input's uint8 scale and zero point computed from the input at run time, as ONNX
        Runtime's ``DynamicQuantizeLinear`` (no calibration needed; convs keep FP32 inputs);
        the activation scheme must then be uint8 per-tensor (the default).
    observer : str
        How activation ranges are calibrated: ``minmax``, ``percentile``, ``mse``, ``entropy``.
    exclude : tuple of str
        Layer names or glob patterns (``encoder.layer.*.output.dense``) kept in FP32.
    percentile : float
        Percentile used by the ``percentile`` observer.
    weight_observer : str
        ``minmax`` (default, as ONNX Runtime) or ``mse`` (per-channel clipping search).
    equalize : bool
        Cross-layer equalization before calibration (conv -> ReLU / ReLU6 / nothing -> conv,
        depthwise included, and Linear -> ReLU -> Linear), with high-bias absorption; the FP32
        function of the model is unchanged.
    bias_correction : bool or str
        Remove each quantized layer's expected output error from its bias: ``True`` /
        ``"empirical"`` measures it on the calibration data (each layer with the layers before
        it already quantized and corrected); ``"analytic"`` computes it without data from
        the weights' rounding and the folded BatchNorms' beta and gamma (the expected input of
        a layer after BatchNorm -> ReLU / ReLU6), for layers that follow a BatchNorm.
    weight_method : str
        How weights are rounded: ``nearest`` (also called ``rtn``), ``adaround`` (learned per
        layer on the calibration data) or ``gptq`` (second-order error feedback from the
        Hessian of each layer's calibration inputs; Linear, GPT-2's Conv1D and one-group
        Conv1d / Conv2d). The export stores the learned / GPTQ codes.
    adaround_iterations : int
        Optimisation steps per layer for ``weight_method="adaround"``.
    gptq_act_order : bool
        GPTQ quantizes the input columns in order of decreasing Hessian diagonal (the inputs
        with the most energy first) instead of left to right.
    smoothquant : float, "auto" or None
        SmoothQuant before calibration (``engine.algorithms.smoothquant``): each Linear's input
        channel
        ``j`` divided by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (folded into the
        LayerNorm or Linear before it) and its weight column multiplied by it; ``alpha`` in
        [0, 1], or ``"auto"`` to choose it per layer from the calibration data.
    quantize_embeddings : bool
        Store ``nn.Embedding`` tables with the weight scheme (per-channel = one scale per row),
        weight-only; an exported transformer's file then shrinks to about a quarter.
    quantize_lm_head : bool
        Quantize a language model's head (the layer ``model.get_output_embeddings()``
        returns, e.g. ``lm_head`` of a ``*ForCausalLM``) like any Linear (default ``True``: at
        8 bits its logits move little, and with a vocabulary of thousands it is one of the
        largest matrices); ``False`` keeps it FP32, as many 4-bit recipes do. A head whose
        weight is tied to the token embeddings (GPT-2) is quantized independently of them.
    quantize_attention_matmuls : bool
        Quantize both inputs of activation x activation matmuls (attention's ``Q K^T`` and
        ``attn V``, ``torch.matmul`` / ``@`` outside any layer) with the activation scheme;
        ONNX Runtime runs them as MatMulIntegerToFloat. Off by default until a quiet
        measurement confirms the gain (README). transformers models need
        ``attn_implementation="eager"``
        (SDPA is one op with the matmuls inside).
    overrides : dict
        Per-layer precision: ``{"pattern": {"weight": Scheme, "activation": Scheme or None}}``
        with layer names or glob patterns as in ``exclude``. A missing key keeps the config's
        scheme; ``"activation": None`` keeps that layer's input FP32 (weight-only). When
        several patterns match a layer, later ones replace the keys they give. The activation
        quantizers the engine places outside layers (conv / add / concat / pool outputs,
        matmul inputs: the rows of ``report.sites``) are matched by their site name
        (``"add#0"``, ``"layer1.*iadd*"``; ``"*"`` matches every layer and every site) with
        the ``"activation"`` key (``None``: that site stays FP32). A site no pattern names
        follows the layers around it: the highest precision among the layer whose output it
        quantizes and the layers it feeds (through pooling, reshapes, other sites), and it is
        dropped when all of those are FP32.
    """

    weight: Scheme = field(default_factory=lambda: Scheme(8, True, True, 0))
    activation: Scheme | None = field(default_factory=lambda: Scheme(8, False, False))
    observer: str = "minmax"
    exclude: tuple[str, ...] = ()
    percentile: float = 99.99
    weight_observer: str = "minmax"
    quantize_embeddings: bool = False
    quantize_lm_head: bool = True
    quantize_attention_matmuls: bool = False
    equalize: bool = False
    bias_correction: bool | str = False
    weight_method: str = "nearest"
    adaround_iterations: int = 1000
    gptq_act_order: bool = False
    smoothquant: float | str | None = None
    overrides: Mapping[str, Mapping[str, Scheme | None]] = field(default_factory=dict)
    activation_mode: str = "static"

    def __post_init__(self) -> None:
        if not isinstance(self.weight, Scheme):
            raise ConfigError(
                f"QuantConfig.weight must be a Scheme, got {type(self.weight).__name__}; "
                "pass e.g. wb.Scheme(bits=8, symmetric=True, per_channel=True)"
            )
        if self.activation is not None and not isinstance(self.activation, Scheme):
            raise ConfigError("QuantConfig.activation must be a Scheme or None (weight-only)")
        if self.activation is not None and self.activation.group_size is not None:
            raise ConfigError(
                "block-wise (group_size) activations are not supported: group_size is for "
                "Linear weights; use a per-tensor activation Scheme (group_size=None)"
            )
        if self.activation is not None and self.activation.per_channel:
            raise ConfigError(
                "per-channel activations are not supported; use a per-tensor activation Scheme"
            )
        if self.weight.per_channel and self.weight.axis != 0:
            raise ConfigError(
                f"per-channel weights use axis=0 (the output channels of Linear / Conv, which "
                f"the bias and the exported DequantizeLinear follow), got axis="
                f"{self.weight.axis}; pass wb.Scheme(..., per_channel=True, axis=0)"
            )
        if not isinstance(self.observer, str) or self.observer not in OBSERVER_NAMES:
            raise ConfigError(
                f"unknown observer {self.observer!r}; choose one of {', '.join(OBSERVER_NAMES)}"
            )
        if (
            not isinstance(self.weight_observer, str)
            or self.weight_observer not in WEIGHT_OBSERVER_NAMES
        ):
            raise ConfigError(
                f"unknown weight_observer {self.weight_observer!r}; "
                f"choose one of {', '.join(WEIGHT_OBSERVER_NAMES)}"
            )
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, Real):
            raise ConfigError(
                f"percentile must be a number in (50, 100], got "
                f"{type(self.percentile).__name__} {self.percentile!r}; e.g. percentile=99.99"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(
                f"percentile must be in (50, 100], got {self.percentile}; e.g. percentile=99.99"
            )
        for flag in ("quantize_embeddings", "quantize_lm_head", "quantize_attention_matmuls"):
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise ConfigError(
                    f"QuantConfig {flag} must be True or False, got {type(value).__name__} "
                    f"{value!r}"
                )
        object.__setattr__(self, "exclude", exclude_patterns(self.exclude))
        self._check_ptq_methods()
        object.__setattr__(self, "overrides", override_table(self.overrides))
        self._check_activation_mode()

    def __hash__(self) -> int:  # overrides is a dict: hash its items
        fields = [getattr(self, f) for f in self.__dataclass_fields__ if f != "overrides"]
        items = tuple((p, tuple(v.items())) for p, v in self.overrides.items())
        return hash((*fields, items))

    def schemes_for(self, name: str) -> tuple[Scheme, Scheme | None]:
        """``(weight scheme, activation scheme or None)`` of the layer ``name``, with the
        overrides whose pattern matches it applied in order."""
        weight, activation = self.weight, self.activation
        for pattern, override in self.overrides.items():
            if name == pattern or fnmatch.fnmatchcase(name, pattern):
                weight = override.get("weight", weight)
                activation = override.get("activation", activation)
        return weight, activation

    def site_activation(self, site: str) -> tuple[str | None, Scheme | None]:
        """``(pattern, scheme)`` of the last override whose pattern matches the activation
        quantizer site ``site`` (``"add#0"``, ``"layer1.0.__iadd__#0"``: the names of
        ``report.sites``) and that gives an ``"activation"``; ``(None, None)`` when none does
        (the site then follows the layers around it). A scheme of None keeps the site FP32."""
        found: tuple[str | None, Scheme | None] = (None, None)
        for pattern, override in self.overrides.items():
            if "activation" in override and (site == pattern or fnmatch.fnmatchcase(site, pattern)):
                found = (pattern, override["activation"])
        return found

    @property
    def dynamic(self) -> bool:
        """Whether activation scales are computed from each input (``activation_mode``)."""
        return self.activation_mode == "dynamic"

    def _check_activation_mode(self) -> None:
        mode = self.activation_mode
        if not isinstance(mode, str) or mode not in ACTIVATION_MODES:
            raise ConfigError(
                f"unknown activation_mode {mode!r}; choose 'static' (calibrated scales) or "
                "'dynamic' (scales from each input, preset 'int8-dynamic')"
            )
        if not self.dynamic:
            return
        if self.activation is None:
            raise ConfigError(
                "activation_mode='dynamic' quantizes activations, but activation=None is "
                "weight-only; use QuantConfig.preset('int8-dynamic')"
            )
        fix = "dynamic activations are uint8 per tensor, as ONNX Runtime's DynamicQuantizeLinear"
        if self.activation != DYNAMIC_SCHEME:
            raise ConfigError(
                f"activation_mode='dynamic' takes activation={DYNAMIC_SCHEME!r}, got "
                f"{self.activation!r} ({fix}); drop the activation argument"
            )
        if self.weight.group_size is not None:
            raise ConfigError(
                "activation_mode='dynamic' takes per-channel or per-tensor weights; block-wise "
                "weights (group_size) run as MatMulNBits, which quantizes its input itself: "
                "use a weight-only preset such as 'int4-weight-g32'"
            )
        for pattern, override in self.overrides.items():
            scheme = override.get("activation", DYNAMIC_SCHEME)
            if scheme is not None and scheme != DYNAMIC_SCHEME:
                raise ConfigError(
                    f"overrides[{pattern!r}]['activation'] is {scheme!r}; {fix}: give "
                    "None (FP32 input) or leave the activation out"
                )

    def _check_ptq_methods(self) -> None:
        if not isinstance(self.equalize, bool):
            raise ConfigError(f"QuantConfig equalize must be True or False, got {self.equalize!r}")
        correction = self.bias_correction
        if not isinstance(correction, bool | str) or correction not in BIAS_CORRECTIONS:
            raise ConfigError(
                f"unknown bias_correction {self.bias_correction!r}; "
                "choose True (or 'empirical': measured on the calibration data), 'analytic' "
                "(from the folded BatchNorms' statistics, no data) or False"
            )
        if isinstance(self.weight_method, str) and self.weight_method in WEIGHT_METHOD_ALIASES:
            object.__setattr__(self, "weight_method", WEIGHT_METHOD_ALIASES[self.weight_method])
        if not isinstance(self.weight_method, str) or self.weight_method not in WEIGHT_METHODS:
            raise ConfigError(
                f"unknown weight_method {self.weight_method!r}; "
                f"choose one of {', '.join(WEIGHT_METHODS)}"
            )
        iterations = self.adaround_iterations
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(
                f"adaround_iterations must be a positive int, got {iterations!r}; e.g. 1000"
            )
        if not isinstance(self.gptq_act_order, bool):
            raise ConfigError(
                f"QuantConfig gptq_act_order must be True or False, got {self.gptq_act_order!r}"
            )
        alpha = self.smoothquant
        valid_alpha = isinstance(alpha, int | float) and not isinstance(alpha, bool)
        if not (alpha is None or alpha == "auto" or (valid_alpha and 0.0 <= alpha <= 1.0)):
            raise ConfigError(
                f"QuantConfig smoothquant must be an alpha in [0, 1] (e.g. 0.5), 'auto' or None, "
                f"got {alpha!r}"
            )

    @property
    def bias_correction_method(self) -> str | None:
        """``"empirical"``, ``"analytic"`` or None (no bias correction)."""
        if self.bias_correction is False:
            return None
        return "empirical" if self.bias_correction is True else self.bias_correction

    @classmethod
    def preset(cls, name: str, **overrides) -> QuantConfig:
        """A named preset; keyword overrides replace its fields.

        ``int8``             per-channel symmetric int8 weights, per-tensor asymmetric uint8
                             activations (what ONNX Runtime runs fastest on x86: U8S8).
        ``int8-per-tensor``  as ``int8`` with one weight scale per tensor.
        ``int8-weight-only`` int8 per-channel weights, FP32 activations.
        ``int8-dynamic``     as ``int8`` with each Linear input's scale computed from the input
                             at run time (ONNX Runtime's ``quantize_dynamic``); no calibration.
        ``int4-weight``      4-bit per-channel symmetric weights, uint8 activations.
        ``w4a4``             4-bit per-channel weights and 4-bit activations.
        ``int4-weight-g32``  4-bit symmetric block-wise weights, one scale per 32 inputs of
                             each output channel, FP32 activations (weight-only): exported as
                             packed 4-bit MatMulNBits, ONNX Runtime's 4-bit kernel.
        ``int4-weight-g128`` as ``int4-weight-g32`` with groups of 128 inputs (smaller file,
                             coarser scales).
        Block-wise presets quantize Linear weights and embedding tables
        (``quantize_embeddings``: groups along each row, exported packed as
        GatherBlockQuantized; one scale per row when the row length is no multiple of the
        group size); a conv needs a per-channel override or ``exclude``.
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        for key in overrides:
            if key not in cls.__dataclass_fields__:
                raise unknown_field_error(key, f"QuantConfig.preset({name!r}, ...)")
        return replace(PRESETS[name], **overrides)

    def describe(self) -> str:
        act = self.activation.describe() if self.activation else "fp32"
        if self.dynamic:
            text = f"weights {self.weight.describe()}, activations {act} dynamic (per input)"
        else:
            text = f"weights {self.weight.describe()}, activations {act}, observer {self.observer}"
        for pattern, override in self.overrides.items():
            parts = [
                f"{key} {scheme.describe() if scheme is not None else 'fp32'}"
                for key, scheme in override.items()
            ]
            text += f", {pattern}: {' / '.join(parts) or 'as the config'}"
        return text + "".join(f", {name}" for name in self.ptq_methods())

    def ptq_methods(self) -> list[str]:
        """The PTQ refinements this config applies, in the order they run."""
        methods = ["cross-layer equalization"] if self.equalize else []
        if self.smoothquant is not None:
            methods.append(f"SmoothQuant (alpha {self.smoothquant})")
        if self.weight_method != "nearest":
            order = " (act-order)" if self.weight_method == "gptq" and self.gptq_act_order else ""
            methods.append(f"{self.weight_method} rounding{order}")
        if self.bias_correction_method is not None:
            methods.append(f"{self.bias_correction_method} bias correction")
        return methods


def unknown_field_error(key: str, call: str) -> ConfigError:
    """The error for a keyword QuantConfig does not have, naming the close match (a Scheme
    setting such as ``per_channel`` is told where it belongs)."""
    fields = list(QuantConfig.__dataclass_fields__)
    scheme_fields = list(Scheme.__dataclass_fields__)
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    near_scheme = difflib.get_close_matches(key, scheme_fields, n=1, cutoff=0.6)
    if near_scheme and (not close or key not in fields):
        setting = near_scheme[0]
        return ConfigError(
            f"{call} got an unknown keyword {key!r}; {setting!r} is a Scheme setting: pass "
            f"weight=wb.Scheme(8, True, {setting}=...) (or activation=...), or a preset such as "
            "'int8-per-tensor'"
        )
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(
        f"{call} got an unknown keyword {key!r}; {hint}QuantConfig takes {', '.join(fields)}"
    )


PRESETS: dict[str, QuantConfig] = {
    "int8": QuantConfig(),
    "int8-per-tensor": QuantConfig(weight=Scheme(8, True, False)),
    "int8-weight-only": QuantConfig(activation=None),
    "int8-dynamic": QuantConfig(activation_mode="dynamic"),
    "int4-weight": QuantConfig(weight=Scheme(4, True, True, 0)),
    "w4a4": QuantConfig(weight=Scheme(4, True, True, 0), activation=Scheme(4, False, False)),
    "int4-weight-g32": QuantConfig(weight=Scheme(4, True, True, 0, group_size=32), activation=None),
    "int4-weight-g128": QuantConfig(
        weight=Scheme(4, True, True, 0, group_size=128), activation=None
    ),
}
