"""The candidates of ``wb.autotune``, in the order a practitioner tries them.

1. ``preset``: the presets as they are (cheap: one calibration each).
2. ``observer``: other activation observers and the MSE weight observer, per-channel weights
   where the preset had per-tensor ones, on each precision layout that missed the budget.
3. ``method``: the methods that fix what the first report shows (``analysis.diagnosis``):
   SmoothQuant where Linear inputs carry outlier channels, cross-layer equalization and bias
   correction for depthwise convolutions, AdaRound and GPTQ where the weight error dominates;
   bias correction and AdaRound when nothing stands out. Built on the layout's best config.
4. ``per-layer``: the most sensitive layers (``wb.sensitivity``, ranked by output SQNR: no
   evaluation spent) kept at 8 bits (a config below 8 bits) or FP32, one more at a time.

A candidate's *layout* is what decides the exported graph's kernels and bytes: each layer's
weight and input schemes, static or dynamic inputs, the layers kept FP32. Observers and
methods change the values in the file, not its kernels, so two candidates of one layout run
equally fast and weigh the same: that is what lets the search skip candidates that cannot beat
the best run on the objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from workbench.analysis.diagnosis import InputOutliers
from workbench.core.scheme import Scheme
from workbench.engine.config import QuantConfig
from workbench.workflows.precision_search import higher_precision_config, kept_config

STAGES = ("preset", "observer", "method", "per-layer")
LATENCY_PRESETS = ("int8", "int8-dynamic", "int8-weight-only")
SIZE_PRESETS = ("int8", "int8-weight-only", "int4-weight-g32")
ACTIVATION_OBSERVERS = ("mse", "percentile", "entropy")
MAX_KEPT_LAYERS = 4  # per-layer precision: at most this many layers kept higher


@dataclass(frozen=True)
class Candidate:
    """One configuration to try: its name in the table, its stage, why it is tried."""

    name: str
    stage: str
    config: QuantConfig
    why: str

    @property
    def layout(self) -> tuple:
        return layout_of(self.config)


def _scheme_key(scheme: Scheme | None) -> tuple | None:
    if scheme is None:
        return None
    return (scheme.bits, scheme.symmetric, scheme.per_channel, scheme.group_size)


def layout_of(config: QuantConfig) -> tuple:
    """What fixes the exported graph's kernels and size (not its values)."""
    overrides = tuple(
        (pattern, tuple((key, _scheme_key(scheme)) for key, scheme in override.items()))
        for pattern, override in config.overrides.items()
    )
    return (
        _scheme_key(config.weight),
        _scheme_key(config.activation),
        config.activation_mode,
        tuple(sorted(config.exclude)),
        overrides,
        config.quantize_embeddings,
        config.quantize_lm_head,
        config.quantize_attention_matmuls,
        # SmoothQuant puts a Mul before the Linears whose 1/s cannot fold into a LayerNorm
        # or a Linear: a graph of its own
        config.smoothquant is not None,
    )


def layout_label(config: QuantConfig) -> str:
    """``w8 per-channel, a8 static`` and the layers held higher, for the table."""
    weight = config.weight
    text = f"w{weight.bits} " + (
        f"g{weight.group_size}"
        if weight.group_size
        else "per-channel"
        if weight.per_channel
        else "per-tensor"
    )
    if config.activation is None:
        text += ", a fp32"
    else:
        text += f", a{config.activation.bits} {config.activation_mode}"
    if config.exclude:
        text += f", {len(config.exclude)} FP32"
    if config.overrides:
        text += f", {len(config.overrides)} kept higher"
    if config.smoothquant is not None:
        text += ", smoothed"
    return text


def preset_candidates(presets: Sequence[str | QuantConfig]) -> list[Candidate]:
    candidates = []
    for index, preset in enumerate(presets):
        if isinstance(preset, QuantConfig):
            name = f"config {index + 1}"
            config = preset
        else:
            name, config = str(preset), QuantConfig.preset(str(preset))
        candidates.append(Candidate(name, "preset", config, "preset"))
    return candidates


def observer_candidates(base: Candidate) -> list[Candidate]:
    """Cheap variants of a layout's preset: observers, per-channel weights."""
    config, out = base.config, []
    if config.activation is not None and not config.dynamic:
        for observer in ACTIVATION_OBSERVERS:
            if observer != config.observer:
                out.append(
                    Candidate(
                        f"{base.name} + {observer} observer",
                        "observer",
                        replace(config, observer=observer),
                        "activation ranges from another observer",
                    )
                )
    if config.weight_observer != "mse" and config.weight.group_size is None:
        out.append(
            Candidate(
                f"{base.name} + mse weights",
                "observer",
                replace(config, weight_observer="mse"),
                "weight ranges clipped where that lowers the MSE",
            )
        )
    if not config.weight.per_channel:
        out.append(
            Candidate(
                f"{base.name} + per-channel",
                "observer",
                replace(config, weight=replace(config.weight, per_channel=True, axis=0)),
                "one weight scale per output channel",
            )
        )
    return out


@dataclass(frozen=True)
class Diagnosis:
    """The facts that choose the methods (``analysis.diagnosis``)."""

    outliers: InputOutliers | None
    depthwise: tuple[str, ...]
    weight_dominated: bool
    has_linear: bool

    def describe(self) -> str:
        parts = []
        if self.outliers is not None:
            parts.append(self.outliers.describe())
        if self.depthwise:
            parts.append(f"{len(self.depthwise)} depthwise conv(s)")
        if self.weight_dominated:
            parts.append("weight error dominates")
        return "; ".join(parts) or "nothing stands out"


def method_candidates(base: Candidate, diagnosis: Diagnosis) -> list[Candidate]:
    """The methods for what the report shows, each on top of ``base`` (the layout's best)."""
    config, out = base.config, []
    static_inputs = config.activation is not None and not config.dynamic

    def add(suffix: str, why: str, **fields: Any) -> None:
        out.append(Candidate(f"{base.name} + {suffix}", "method", replace(config, **fields), why))

    if diagnosis.outliers is not None and config.activation is not None and diagnosis.has_linear:
        why = diagnosis.outliers.describe()
        add("SmoothQuant 0.5", why, smoothquant=0.5)
        add("SmoothQuant auto", why, smoothquant="auto")
    if diagnosis.depthwise and static_inputs:
        why = f"{len(diagnosis.depthwise)} depthwise conv(s), e.g. {diagnosis.depthwise[0]}"
        add("CLE + bias correction", why, equalize=True, bias_correction=True)
    if diagnosis.weight_dominated and config.weight_method == "nearest":
        why = "weight error dominates (weight SQNR close to the layer's output SQNR)"
        add("AdaRound", why, weight_method="adaround")
        if diagnosis.has_linear:
            add("GPTQ", why, weight_method="gptq")
        if static_inputs:
            add("AdaRound + bias correction", why, weight_method="adaround", bias_correction=True)
    if not out and static_inputs:
        why = "nothing stands out in the report: the generic refinements"
        add("bias correction", why, bias_correction=True)
        if config.weight_method == "nearest":
            add("AdaRound", why, weight_method="adaround")
    return out


# What a method costs, cheapest first: SmoothQuant and CLE rescale weights once, bias
# correction runs the calibration batches once more, GPTQ solves one Hessian per layer,
# AdaRound optimises every layer for ``adaround_iterations`` steps.
METHOD_COST = {
    "smoothquant": 0,
    "equalize": 1,
    "bias_correction": 1,
    "gptq": 2,
    "adaround": 3,
}


def method_cost(candidate: Candidate) -> int:
    config = candidate.config
    costs = [METHOD_COST["smoothquant"] if config.smoothquant is not None else -1]
    costs.append(METHOD_COST["equalize"] if config.equalize else -1)
    costs.append(METHOD_COST["bias_correction"] if config.bias_correction else -1)
    if config.weight_method != "nearest":
        costs.append(METHOD_COST[config.weight_method])
    return max(costs)


def per_layer_candidates(base: Candidate, ranking: Sequence[str], layers: int) -> list[Candidate]:
    """``base`` with its 1, 2, ... most sensitive layers kept at 8 bits (a config below 8
    bits) or FP32; at most ``MAX_KEPT_LAYERS`` and never all layers."""
    fallback = higher_precision_config(base.config)
    held = "8-bit" if fallback is not None else "FP32"
    out = []
    for count in range(1, min(MAX_KEPT_LAYERS, layers - 1) + 1):
        kept = list(ranking[:count])
        config = kept_config(base.config, fallback, kept)
        out.append(
            Candidate(
                f"{base.name} + {count} most sensitive {held}",
                "per-layer",
                config,
                f"kept {held} by output SQNR sensitivity: {', '.join(kept)}",
            )
        )
    return out
