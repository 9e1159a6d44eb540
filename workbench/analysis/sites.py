"""The sites table: one row per activation quantizer of a quantized model.

Layer inputs (the model's input among them), the outputs the engine quantizes after convs,
adds, concats and pools, the inputs of activation x activation matmuls: each is a place where
an integer runtime rounds a tensor. A row gives the name ``QuantConfig.overrides`` matches
(``site``), what it quantizes, its scheme, scale and zero point, the quantizer whose grid it
takes over, and its SQNR on the report's data:

    SQNR_dB = 10 log10( sum x^2 / sum (x - Q(x))^2 )

with ``x`` the tensor arriving at the quantizer in the quantized model and ``Q(x)`` what it
returns (the error of this rounding alone, not the error accumulated before it).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
from torch import nn

from workbench.engine.calibration.batches import run_model
from workbench.engine.capture.modules import hooks_removed
from workbench.engine.placement.layers import QuantizedLayer
from workbench.engine.quantizers.modules import ActivationQuantizer

SITES_TITLE = "Quantizer sites"
SITE_COLUMNS = [
    "site",
    "kind",
    "quantizes",
    "bits",
    "symmetric",
    "scale",
    "zero_point",
    "shares_scale_of",
    "sqnr_db",
    "quantizer",
]


def _layer_sites(model: nn.Module) -> dict[int, tuple[str, str]]:
    """id(quantizer) -> (site, kind) of the input quantizers of quantized layers: the layer's
    name (``overrides`` matches it through the layer), ``name#n`` for a later call."""
    sites: dict[int, tuple[str, str]] = {}
    for module in model.modules():
        if not isinstance(module, QuantizedLayer):
            continue
        if module.input_quantizer is not None:
            sites[id(module.input_quantizer)] = (module.layer_name, "layer input")
        for call, quantizer in enumerate(getattr(module, "call_input_quantizers", ()), 1):
            sites[id(quantizer)] = (f"{module.layer_name}#{call}", "layer input")
        output = module.output_quantizer
        if output is not None and not getattr(output, "site", ""):
            sites[id(output)] = (module.layer_name, "layer output")
    return sites


def activation_quantizers(model: nn.Module) -> list[tuple[str, ActivationQuantizer]]:
    """``(path, quantizer)`` of every activation quantizer of ``model``, each once."""
    seen: set[int] = set()
    found = []
    for path, module in model.named_modules():
        if isinstance(module, ActivationQuantizer) and id(module) not in seen:
            seen.add(id(module))
            found.append((path, module))
    return found


def measure_site_sqnr(model: nn.Module, batches: list[Any]) -> dict[int, float]:
    """id(quantizer) -> SQNR (dB) of its own rounding over ``batches`` (inf when exact)."""
    signal: dict[int, float] = {}
    noise: dict[int, float] = {}

    def hook(module, args, output):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        x, q = x.detach().double(), output.detach().double()
        key = id(module)
        signal[key] = signal.get(key, 0.0) + float((x * x).sum())
        noise[key] = noise.get(key, 0.0) + float(((x - q) ** 2).sum())

    handles = [
        quantizer.register_forward_hook(hook) for _, quantizer in activation_quantizers(model)
    ]
    with hooks_removed(handles), torch.no_grad():
        for index, batch in enumerate(batches):
            run_model(model, batch, index)
    sqnr: dict[int, float] = {}
    for key, power in signal.items():
        error = noise[key]
        sqnr[key] = math.inf if error == 0.0 else 10.0 * math.log10(max(power, 1e-300) / error)
    return sqnr


def _number(tensor: torch.Tensor) -> float | str:
    """One scale / zero point as a number, several (per channel) as a short text."""
    flat = tensor.detach().flatten()
    if flat.numel() == 1:
        return float(flat[0])
    return f"{flat.numel()} values, {float(flat.min()):.4g} .. {float(flat.max()):.4g}"


def site_table(model: nn.Module, batches: list[Any] | None = None) -> pd.DataFrame:
    """One row per activation quantizer of a calibrated ``model`` (see the module docstring);
    ``sqnr_db`` measured on ``batches`` (NaN for a quantizer they do not reach)."""
    sqnr = measure_site_sqnr(model, batches) if batches else {}
    layer_sites = _layer_sites(model)
    rows = []
    for path, quantizer in activation_quantizers(model):
        own_site = getattr(quantizer, "site", "")  # a model saved before sites had names
        own_kind = getattr(quantizer, "site_kind", "")
        site, kind = layer_sites.get(id(quantizer), (own_site or path, "layer input"))
        if own_site:
            site, kind = own_site, own_kind or kind
        elif own_kind:
            kind = own_kind
        dynamic = quantizer.dynamic
        rows.append(
            {
                "site": site,
                "kind": kind,
                "quantizes": quantizer.tensor_name,
                "bits": quantizer.scheme.bits,
                "symmetric": quantizer.scheme.symmetric,
                "scale": math.nan if dynamic else _number(quantizer.scale),
                "zero_point": math.nan if dynamic else _number(quantizer.zero_point),
                "shares_scale_of": quantizer.shares_scale_of or "",
                "sqnr_db": sqnr.get(id(quantizer), math.nan),
                "quantizer": path,
            }
        )
    return pd.DataFrame(rows, columns=SITE_COLUMNS)
