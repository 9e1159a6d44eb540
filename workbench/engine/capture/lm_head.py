"""The language-model head of a ``transformers`` model: the layer that maps the last hidden
state to one logit per vocabulary entry (``model.get_output_embeddings()``).

``QuantConfig(quantize_lm_head=False)`` keeps it FP32. GPT-2, OPT and many LLaMA-style models
tie its weight to the token embedding table (one tensor); quantizing one of the two never
changes the other: each quantized layer rounds its own view of the tensor, and the FP32 one
reads it as it is.
"""

from __future__ import annotations

from torch import nn


def lm_head_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_modules()``) of the modules that some module of ``model``
    returns from ``get_output_embeddings()``: a ``*ForCausalLM``'s ``lm_head``, also when the
    model wraps one. Empty for models without such a method."""
    heads: set[int] = set()
    for module in model.modules():
        method = getattr(module, "get_output_embeddings", None)
        if not callable(method):
            continue
        try:
            head = method()
        except (AttributeError, NotImplementedError, TypeError):
            continue
        if isinstance(head, nn.Module):
            heads.add(id(head))
    return {name for name, module in model.named_modules() if id(module) in heads}
