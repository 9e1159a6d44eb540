"""A BERT from a transformers config whose activations carry outlier channels, as pretrained
BERT and OPT do (a handful of hidden dims 20-100x larger than the rest), so that static
per-tensor W8A8 visibly degrades on it. A randomly initialised BERT has no such channels.

The outliers are planted the way a trained model carries them:

* every LayerNorm's weight and bias are scaled up on the outlier dims: each Linear after a
  LayerNorm (query, key, value, the FFN's first Linear) sees a few input channels far wider
  than the rest, so a per-tensor activation scale leaves the other channels a few levels;
* those Linears read the outlier dims with weights scaled down by the same factor (a trained
  model learns small weights for them), so what the attention and the FFN compute stays
  ordinary;
* the attention output and FFN output Linears write the outlier dims scaled up (rows of the
  weight and bias), so the residual stream keeps them from layer to layer.

Weights are drawn with a wider init (``initializer_range=0.1``) than BERT's 0.02, so that each
sublayer contributes to the residual stream as much as a trained one does (with 0.02 the
residual dwarfs every sublayer and no quantization error reaches the output).

Usable from tests and from benchmark scripts (``sys.path`` holding ``tests/``)::

    from zoo.outlier_bert import outlier_bert, outlier_tokens
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB_SIZE = 1000
DEFAULT_SCALES = (20.0, 40.0, 60.0, 100.0)


def outlier_bert(
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    outlier_scales: tuple[float, ...] = DEFAULT_SCALES,
    max_tokens: int = 512,
    seed: int = 0,
) -> nn.Module:
    """A BertModel (eager attention, eval mode, no pooler) with ``len(outlier_scales)`` outlier
    hidden dims, chosen at random from ``seed``; ``model.config.outlier_channels`` lists them."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_tokens,
        initializer_range=0.1,
    )
    config._attn_implementation = "eager"
    model = BertModel(config, add_pooling_layer=False).eval()
    generator = torch.Generator().manual_seed(seed)
    channels = torch.randperm(hidden, generator=generator)[: len(outlier_scales)]
    scales = torch.tensor(outlier_scales, dtype=torch.float32)
    with torch.no_grad():
        norms = [model.embeddings.LayerNorm]
        for block in model.encoder.layer:
            norms += [block.attention.output.LayerNorm, block.output.LayerNorm]
            readers = (
                block.attention.self.query,
                block.attention.self.key,
                block.attention.self.value,
                block.intermediate.dense,
            )
            for linear in readers:
                linear.weight[:, channels] /= scales
            for linear in (block.attention.output.dense, block.output.dense):
                linear.weight[channels] *= scales[:, None]
                linear.bias[channels] *= scales
        for norm in norms:
            norm.weight[channels] *= scales
            norm.bias[channels] *= scales
    config.outlier_channels = sorted(channels.tolist())
    return model


def outlier_tokens(count: int, batch: int = 8, seq: int = 32, seed: int = 1) -> list[dict]:
    """Random token ids with a full attention mask, as a tokenizer's output."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, VOCAB_SIZE, (batch, seq), generator=generator),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }
        for _ in range(count)
    ]
