"""transformers models from configs (random weights, nothing downloaded), small enough for
the test suite: BERT, DistilBERT and ViT encoders; GPT-2, LLaMA and OPT causal LMs (2 layers,
hidden 64, vocabulary 256)."""

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


DECODER_VOCAB = 256


def gpt2(hidden: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    """GPT-2 (``Conv1D`` projections, ``lm_head`` tied to the token embeddings)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=DECODER_VOCAB,
        n_positions=64,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


def llama_config(
    hidden: int = 64, layers: int = 2, vocab: int = DECODER_VOCAB, positions: int = 64, **more
):
    """The tiny LLaMA's configuration: 4 heads, 2 key/value heads, MLP twice the hidden size,
    token 0 begins and ends; ``more`` sets further fields (``tie_word_embeddings``, ...)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=0,
        eos_token_id=0,
        **more,
    )


def llama(hidden: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    """LLaMA (RMSNorm, rotary positions, SwiGLU, grouped key/value heads, untied head)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = llama_config(hidden, layers)
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


def opt(hidden: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    """OPT (learned positions offset by 2, ReLU MLP, head tied to the token embeddings)."""
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=DECODER_VOCAB,
        hidden_size=hidden,
        ffn_dim=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=hidden,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


def tokens(count: int, batch: int = 2, seq: int = 8, seed: int = 1, vocab: int = 100) -> list[dict]:
    """Random token ids with a full attention mask, as a tokenizer's output."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, vocab, (batch, seq), generator=generator),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }
        for _ in range(count)
    ]
