"""A quantized ``transformers`` decoder as a standard Hugging Face GPTQ checkpoint.

The format (AutoGPTQ / optimum / gptqmodel, ``checkpoint_format: "gptq"``), for a Linear
``W [out, in]`` quantized to ``b`` bits (b in 2, 4, 8) in groups of ``g`` inputs
(``G = in / g`` groups; ``g = in`` is one group per output channel, written ``-1``):

* ``qweight``: int32 ``[in * b / 32, out]``; word ``i`` of column ``n`` holds the unsigned codes
  of inputs ``i * 32/b .. i * 32/b + 32/b - 1`` of output ``n``, the first in the low bits;
* ``qzeros``: int32 ``[G, out * b / 32]``: zero point minus one (the "v1" convention every
  GPTQ loader undoes by adding one), masked to ``b`` bits, packed along the outputs the same way;
* ``scales``: ``[G, out]``; ``g_idx``: int32 ``[in]``, the group of each input;
* ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])``.

A symmetric signed code ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` is stored as ``q + 2^(b-1)`` with
zero point ``2^(b-1)``. Our GPTQ with act-order fixes the group scales first ("static
groups"), so every group is a contiguous run of inputs and ``g_idx[k] = k // g`` whether or not
act-order ran; ``desc_act`` records that it did. Scales are written in the model's dtype
(float32 for an FP32 model: the checkpoint is the simulation exactly; AutoGPTQ writes
float16). Everything not quantized is written as it is in the quantized model (a block-wise
embedding table as its dequantized values).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.atomic_file import current_umask
from workbench.engine.placement.layers import (
    QuantizedEmbedding,
    QuantizedLayer,
    iter_quantized_layers,
)
from workbench.engine.quantizers.modules import ActivationQuantizer
from workbench.errors import ExportError

GPTQ_BITS = (2, 4, 8)
WEIGHTS_FILE = "model.safetensors"


def pack_int32_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``values [R, C]`` packed along the rows: int32 ``[R * bits / 32, C]``, row
    ``r`` of each word in bits ``(r % per) * bits`` and up."""
    per = 32 // bits
    rows, columns = values.shape
    words = values.astype(np.uint32).reshape(rows // per, per, columns)
    shifts = (np.arange(per, dtype=np.uint32) * bits).reshape(1, per, 1)
    return np.bitwise_or.reduce(words << shifts, axis=1).view(np.int32)


def layer_codes(layer: QuantizedLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The integer codes ``[out, in]``, scales ``[out, G]`` and zero points ``[out, G]`` of
    the weight the simulation uses, and the group size."""
    scheme = layer.weight_quantizer.scheme
    with torch.no_grad():
        weight_dq = layer.quantized_weight().detach().to(torch.float32)
        scale, zero_point = layer.weight_quantizer.qparams(layer.layer.weight)
    out, columns = weight_dq.shape
    group_size = scheme.group_size or columns
    groups = columns // group_size
    scale, zero_point = (
        _per_row(scale.detach().to(torch.float32), out),
        _per_row(zero_point.detach().to(torch.int32), out),
    )
    if scale.shape[1] == 1 and groups > 1:  # a per-channel / per-tensor grid in every group
        scale, zero_point = scale.expand(out, groups), zero_point.expand(out, groups)
    s = scale.repeat_interleave(group_size, dim=1)
    z = zero_point.to(torch.float32).repeat_interleave(group_size, dim=1)
    codes = (torch.round(weight_dq / s) + z).clamp(scheme.quant_min, scheme.quant_max)
    return (
        codes.to(torch.int32).numpy(),
        scale.contiguous().numpy(),
        zero_point.contiguous().numpy(),
        group_size,
    )


def _per_row(param: torch.Tensor, out: int) -> torch.Tensor:
    """A 0-d (per-tensor), ``[out]`` (per-channel) or ``[out, G]`` qparam as ``[out, G]``."""
    if param.dim() == 0:
        return param.reshape(1, 1).expand(out, 1)
    return param.reshape(out, -1)


def gptq_tensors(layer: QuantizedLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` (and ``bias``) of one Linear."""
    scheme = layer.weight_quantizer.scheme
    bits = scheme.bits
    codes, scale, zero_point, group_size = layer_codes(layer)
    offset = 2 ** (bits - 1) if scheme.symmetric else 0
    unsigned = (codes + offset).astype(np.uint32)
    zeros = (zero_point + offset).astype(np.int64)
    mask = 2**bits - 1
    tensors = {
        "qweight": torch.from_numpy(pack_int32_rows(unsigned.T, bits).copy()),
        "qzeros": torch.from_numpy(
            pack_int32_rows(((zeros - 1) & mask).astype(np.uint32), bits).T.copy()
        ),
        "scales": torch.from_numpy(scale.T.copy()).to(dtype),
        "g_idx": torch.arange(codes.shape[1], dtype=torch.int32) // group_size,
    }
    if layer.layer.bias is not None:
        tensors["bias"] = layer.layer.bias.detach().to(dtype).clone()
    return tensors


def _is_hf_decoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return hasattr(config, "to_dict") and hasattr(config, "model_type")


def _lm_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            return name
    return None


def check_gptq_exportable(result: Any) -> tuple[int, int | None, bool]:
    """The bits, group size (None: one per row) and symmetry the whole model shares; an
    ``ExportError`` naming what the GPTQ format holds when the model is not that."""
    model = result.model
    supported = (
        "a transformers model (with a .config) whose Linear layers are quantized weight-only "
        f"with one scheme of {'/'.join(map(str, GPTQ_BITS))} bits (block-wise or per-channel, "
        "RTN, GPTQ or AdaRound), activations FP32"
    )
    if not _is_hf_decoder(model):
        raise ExportError(
            f"save_pretrained writes a Hugging Face GPTQ checkpoint, which needs {supported}; "
            f"{type(model).__name__} has no transformers config: use export_onnx instead"
        )
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer) and getattr(module, "enabled", True):
            raise ExportError(
                f"{name!r} quantizes activations, which the GPTQ format cannot hold (it stores "
                f"weights only); it needs {supported}: quantize with activation=None (e.g. "
                "QuantConfig.preset('int4-weight-g32'))"
            )
    plans = {plan.name: plan for plan in result.plans}
    for plan in plans.values():
        if plan.smoothing_alpha is not None or plan.equalized:
            raise ExportError(
                f"layer {plan.name!r} was rescaled by SmoothQuant / equalization, whose input "
                "scaling a GPTQ checkpoint cannot hold; quantize without smoothquant / equalize"
            )
    lm_head = _lm_head_name(model)
    schemes = set()
    for name, layer in iter_quantized_layers(model):
        if isinstance(layer, QuantizedEmbedding):
            continue
        if not isinstance(layer.layer, nn.Linear):
            raise ExportError(
                f"layer {name!r} is a quantized {type(layer.layer).__name__}; the GPTQ format "
                f"holds Linear layers only ({supported}): exclude it"
            )
        scheme = layer.weight_quantizer.scheme
        if not layer.weight_quantizer.enabled:
            continue
        if scheme.bits not in GPTQ_BITS:
            raise ExportError(
                f"layer {name!r} has {scheme.bits}-bit weights; the GPTQ format and ONNX Runtime's "
                f"MatMulNBits hold {GPTQ_BITS} bits: choose one of them"
            )
        out, columns = layer.layer.weight.shape
        group = scheme.group_size or columns
        per = 32 // scheme.bits
        if columns % group or columns % per or out % per:
            raise ExportError(
                f"layer {name!r} is [{out}, {columns}]: the GPTQ format needs in_features a "
                f"multiple of the group size ({group}) and of {per}, and out_features a multiple "
                f"of {per} ({scheme.bits}-bit codes packed {per} per int32); pick a group size "
                "that divides the inputs or exclude the layer"
            )
        schemes.add((scheme.bits, scheme.group_size, scheme.symmetric))
    if not schemes:
        raise ExportError(f"no layer of the model is quantized; save_pretrained needs {supported}")
    if len(schemes) > 1:
        found = ", ".join(f"{b}-bit g{g or -1} {'sym' if s else 'asym'}" for b, g, s in schemes)
        raise ExportError(
            f"the layers use several weight schemes ({found}); a GPTQ checkpoint has one "
            "(bits, group_size, sym): quantize every Linear with the same scheme"
        )
    wrapped = dict(iter_quantized_layers(model))
    quantized = {name for name, layer in wrapped.items() if layer.weight_quantizer.enabled}
    for name, module in model.named_modules():
        if name in wrapped and name not in quantized:  # a wrapped layer kept FP32
            module = wrapped[name].layer
        fp32_linear = isinstance(module, nn.Linear) and not _inside_quantized(name, quantized)
        fp32_linear = fp32_linear and not _inside_quantized(name, set(wrapped) - {name})
        if fp32_linear and name != lm_head:
            raise ExportError(
                f"Linear {name!r} is kept FP32; a GPTQ checkpoint quantizes every Linear of "
                "the decoder layers (only the LM head may stay FP32): remove it from exclude"
            )
    bits, group_size, symmetric = schemes.pop()
    return bits, group_size, symmetric


def _inside_quantized(name: str, quantized: set[str]) -> bool:
    return any(name == q or name.startswith(q + ".") for q in quantized)


def _plain_tensors(result: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the model under its ``transformers`` name, quantized layers in the
    GPTQ layout, the others as the quantized model holds them."""
    model = result.model
    layers = dict(iter_quantized_layers(model))
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key in result.fp32_model.state_dict():
        prefix, _, leaf = key.rpartition(".")
        layer = layers.get(prefix)
        if layer is None:
            tensors[key] = state[key].detach().clone().contiguous()
            continue
        if isinstance(layer, QuantizedEmbedding) or not layer.weight_quantizer.enabled:
            if leaf == "weight":
                with torch.no_grad():
                    tensors[key] = layer.quantized_weight().detach().clone().contiguous()
            else:
                tensors[key] = state[f"{prefix}.layer.{leaf}"].detach().clone().contiguous()
            continue
        if leaf == "weight":
            for name, tensor in gptq_tensors(layer, dtype).items():
                tensors[f"{prefix}.{name}"] = tensor.contiguous()
        elif leaf != "bias":
            tensors[key] = state[f"{prefix}.layer.{leaf}"].detach().clone().contiguous()
    return tensors


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """A fresh folder beside ``target`` to write into; it replaces ``target`` only when the
    block succeeds (a failed call leaves nothing behind, an existing folder as it was), with
    the mode the umask gives a new folder."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield work
        mask = current_umask()  # mkdtemp's 0700 (and safetensors' 0600 files) hide it
        os.chmod(work, 0o777 & ~mask)
        for written in work.rglob("*"):
            os.chmod(written, (0o777 if written.is_dir() else 0o666) & ~mask)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(work, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def check_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    """Special tokens a generator would emit or stop on must be rows of the model's logits."""
    for attribute in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attribute, None)
        ids = value if isinstance(value, list) else [value]
        for token_id in ids:
            if token_id is not None and not 0 <= int(token_id) < vocab_size:
                raise ExportError(
                    f"the tokenizer's {attribute} is {token_id}, outside the model's vocabulary "
                    f"(vocab_size {vocab_size}): ONNX Runtime GenAI's generator refuses to start; "
                    "give the model a row for that token (a larger vocab_size) or the tokenizer "
                    "an eos/bos/pad token inside the vocabulary"
                )


def write_gptq_checkpoint(
    result: Any,
    path: str | os.PathLike,
    tokenizer: Any = None,
    desc_act: bool | None = None,
) -> Path:
    """Write ``result`` (a quantized ``transformers`` model) as a GPTQ checkpoint folder:
    ``config.json`` with ``quantization_config``, ``model.safetensors``, the tokenizer's
    files when one is given. ``desc_act`` defaults to whether GPTQ ran with act-order."""
    from safetensors.torch import save_file

    bits, group_size, symmetric = check_gptq_exportable(result)
    model = result.model
    vocab_size = getattr(model.config, "vocab_size", None)
    if tokenizer is not None and vocab_size is not None:
        check_tokenizer(tokenizer, int(vocab_size))
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.float32
    act_order = bool(getattr(result.config, "gptq_act_order", False))
    lm_head = _lm_head_name(model)
    layers = dict(iter_quantized_layers(model))
    head_quantized = lm_head in layers and layers[lm_head].weight_quantizer.enabled
    methods = {plan.weight_rounding for plan in result.plans if plan.weight_rounding}
    config = copy.deepcopy(model.config)
    config.use_cache = True
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    if head_quantized:
        config.tie_word_embeddings = False  # the head's codes are no longer the table
    if tokenizer is not None and getattr(config, "eos_token_id", None) is None:
        config.eos_token_id = getattr(tokenizer, "eos_token_id", None)
    quantization_config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": bits,
        "group_size": group_size if group_size is not None else -1,
        "sym": symmetric,
        "desc_act": act_order if desc_act is None else bool(desc_act),
        "static_groups": True,
        "true_sequential": True,
        "damp_percent": 0.01,
        "lm_head": bool(head_quantized),
        "quantizer": f"quantization-workbench ({', '.join(sorted(methods)) or 'nearest'})",
    }
    tensors = _plain_tensors(result, dtype)
    target = Path(path)
    try:
        with atomic_folder(target) as work:
            save_file(tensors, str(work / WEIGHTS_FILE), metadata={"format": "pt"})
            config_dict = config.to_dict()
            config_dict["quantization_config"] = quantization_config
            config_dict["use_cache"] = True
            (work / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(work))
    except OSError as exc:
        raise ExportError(f"could not write the checkpoint to {target}: {exc}") from exc
    return target
