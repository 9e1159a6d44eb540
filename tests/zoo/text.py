"""transformers models from configs (random weights, nothing downloaded), small enough for
the test suite: BERT, DistilBERT and ViT."""

from __future__ import annotations

import torch
from torch import nn


def bert(hidden: int = 32, layers: int = 2, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    return BertModel(config, add_pooling_layer=False).eval()


def distilbert(hidden: int = 32, layers: int = 2, seed: int = 0) -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=100,
        dim=hidden,
        n_layers=layers,
        n_heads=2,
        hidden_dim=2 * hidden,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    return DistilBertModel(config).eval()


def vit(hidden: int = 32, layers: int = 2, image: int = 32, seed: int = 0) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image,
        patch_size=8,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
    )
    config._attn_implementation = "eager"
    return ViTModel(config, add_pooling_layer=False).eval()


def tokens(count: int, batch: int = 2, seq: int = 8, seed: int = 1) -> list[dict]:
    """Random token ids with a full attention mask, as a tokenizer's output."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 100, (batch, seq), generator=generator),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }
        for _ in range(count)
    ]
