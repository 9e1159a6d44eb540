"""Tiny LLaMA decoders and a tokenizer trained in-process (offline) for the generation tests."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.text import llama_config

TEXT = [
    "def add(x, y):\n    return x + y\n",
    "for item in items:\n    print(item)\n",
    "the quick brown fox jumps over the lazy dog\n",
    "import os\nimport sys\nclass Tokenizer:\n    pass\n",
]
VOCAB = 264  # 256 byte symbols, the end token and a few merges: a multiple of 8 for packing


def small_tokenizer():
    """A byte-level BPE trained here on a few lines; its end token (id 0) is a row of the
    model's logits, as ``og.Generator`` needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXT * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", bos_token="</s>")


def tiny_llama(hidden: int = 64, layers: int = 2, tie: bool = False, seed: int = 0):
    """The zoo's tiny LLaMA with this tokenizer's vocabulary and 128 positions."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = llama_config(
        hidden, layers, vocab=VOCAB, positions=128, tie_word_embeddings=tie, pad_token_id=0
    )
    return LlamaForCausalLM(config).eval()


def token_batches(count: int = 2, batch: int = 4, length: int = 16, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (batch, length), generator=generator) for _ in range(count)]
