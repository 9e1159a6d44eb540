"""transformers' own model classes from tiny configs (random weights, nothing downloaded).

Each entry builds the library's class as a user would get it (``XxxForImageClassification``,
``XxxModel``, ``AutoModelForCausalLM``) with hidden sizes of 16-64, one or two layers and
small inputs, and gives the batches its forward takes. Weights that a class initializes to
zero (layer scales, some heads) get small random values, so that no output is zero by
construction and every layer's error is measurable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

IMAGE = 32
VOCAB = 96
TOKENS = 12


@dataclass(frozen=True)
class ZooModel:
    family: str  # image, text encoder, decoder, speech
    build: Callable[[], nn.Module]
    data: Callable[[int, int], list[dict]]  # (seed, count) -> batches


def randomize_zeros(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every all-zero floating parameter small random values (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and not param.any():
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def _eager(config):
    config._attn_implementation = "eager"
    return config


def images(seed: int, count: int, size: int = IMAGE) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(2, 3, size, size, generator=generator)} for _ in range(count)
    ]


def tokens(seed: int, count: int, vocab: int = VOCAB) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        mask = torch.ones(2, TOKENS, dtype=torch.long)
        mask[1, -3:] = 0  # a padded sequence
        ids = torch.randint(3, vocab, (2, TOKENS), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def audio(seed: int, count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_values": torch.randn(2, 800, generator=generator)} for _ in range(count)]


def mel(seed: int, count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_features": torch.randn(2, 16, 32, generator=generator)} for _ in range(count)]


def _built(model_cls, config, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_zeros(model_cls(_eager(config)).eval(), seed)


# image -----------------------------------------------------------------------------------------
def resnet():
    import transformers as t

    config = t.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10
    )
    return _built(t.ResNetForImageClassification, config)


def resnet_bottleneck():
    import transformers as t

    config = t.ResNetConfig(
        embedding_size=16,
        hidden_sizes=[32, 64],
        depths=[1, 1],
        layer_type="bottleneck",
        num_labels=10,
    )
    return _built(t.ResNetForImageClassification, config)


def mobilenet_v1():
    import transformers as t

    config = t.MobileNetV1Config(
        image_size=IMAGE, depth_multiplier=0.25, min_depth=8, num_labels=10
    )
    return _built(t.MobileNetV1ForImageClassification, config)


def mobilenet_v2():
    import transformers as t

    config = t.MobileNetV2Config(
        image_size=IMAGE, depth_multiplier=0.25, min_depth=8, num_labels=10
    )
    return _built(t.MobileNetV2ForImageClassification, config)


def efficientnet():
    import transformers as t

    config = t.EfficientNetConfig(
        image_size=IMAGE,
        width_coefficient=0.25,
        depth_coefficient=0.1,
        hidden_dim=320,
        num_labels=10,
    )
    return _built(t.EfficientNetForImageClassification, config)


def convnext():
    import transformers as t

    config = t.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    return _built(t.ConvNextForImageClassification, config)


def convnextv2():
    import transformers as t

    config = t.ConvNextV2Config(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    return _built(t.ConvNextV2ForImageClassification, config)


def regnet():
    import transformers as t

    config = t.RegNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=10
    )
    return _built(t.RegNetForImageClassification, config)


def bit():
    import transformers as t

    config = t.BitConfig(
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="preactivation",
        num_groups=8,
        num_labels=10,
    )
    return _built(t.BitForImageClassification, config)


def _vit_like(config_cls, model_cls, **extra):
    config = config_cls(
        image_size=IMAGE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
        **extra,
    )
    return _built(model_cls, config)


def vit():
    import transformers as t

    return _vit_like(t.ViTConfig, t.ViTForImageClassification)


def deit():
    import transformers as t

    return _vit_like(t.DeiTConfig, t.DeiTForImageClassification)


def beit():
    import transformers as t

    return _vit_like(t.BeitConfig, t.BeitForImageClassification, use_relative_position_bias=True)


def dinov2():
    import transformers as t

    config = t.Dinov2Config(
        image_size=IMAGE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2,
        num_labels=10,
    )
    return _built(t.Dinov2ForImageClassification, config)


def swin():
    import transformers as t

    config = t.SwinConfig(
        image_size=IMAGE,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=4,
        num_labels=10,
    )
    return _built(t.SwinForImageClassification, config)


def segformer():
    import transformers as t

    config = t.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=32,
        num_labels=4,
    )
    return _built(t.SegformerForSemanticSegmentation, config)


def poolformer():
    import transformers as t

    config = t.PoolFormerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        padding=[2, 1],
        num_labels=10,
    )
    return _built(t.PoolFormerForImageClassification, config)


# text encoders ---------------------------------------------------------------------------------
def _encoder(config_cls, model_cls, **fields):
    config = config_cls(vocab_size=VOCAB, max_position_embeddings=32, **fields)
    return _built(model_cls, config)


BERT_SIZES = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def bert():
    import transformers as t

    return _encoder(t.BertConfig, t.BertForSequenceClassification, num_labels=3, **BERT_SIZES)


def roberta():
    import transformers as t

    return _encoder(
        t.RobertaConfig,
        t.RobertaForSequenceClassification,
        num_labels=3,
        pad_token_id=1,
        **BERT_SIZES,
    )


def electra():
    import transformers as t

    return _encoder(
        t.ElectraConfig,
        t.ElectraForSequenceClassification,
        num_labels=3,
        embedding_size=16,
        **BERT_SIZES,
    )


def distilbert():
    import transformers as t

    return _encoder(
        t.DistilBertConfig,
        t.DistilBertForSequenceClassification,
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=64,
        num_labels=3,
    )


def albert():
    import transformers as t

    return _encoder(
        t.AlbertConfig,
        t.AlbertForSequenceClassification,
        embedding_size=16,
        num_labels=3,
        **BERT_SIZES,
    )


def deberta_v2():
    import transformers as t

    return _encoder(
        t.DebertaV2Config,
        t.DebertaV2ForSequenceClassification,
        num_labels=3,
        relative_attention=True,
        position_buckets=8,
        max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
        **BERT_SIZES,
    )


def mobilebert():
    import transformers as t

    return _encoder(
        t.MobileBertConfig,
        t.MobileBertForSequenceClassification,
        num_labels=3,
        hidden_size=32,
        embedding_size=16,
        intra_bottleneck_size=16,
        true_hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_feedforward_networks=2,
    )


def t5_encoder():
    import transformers as t

    config = t.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
    )
    return _built(t.T5EncoderModel, config)


# decoders --------------------------------------------------------------------------------------
def _decoder(config_cls, **fields):
    from transformers import AutoModelForCausalLM

    config = _eager(config_cls(vocab_size=VOCAB, **fields))
    torch.manual_seed(0)
    return randomize_zeros(AutoModelForCausalLM.from_config(config).eval())


LLAMA_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
}


def gpt2():
    import transformers as t

    return _decoder(
        t.GPT2Config, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )


def gpt_bigcode():
    import transformers as t

    return _decoder(
        t.GPTBigCodeConfig, n_positions=32, n_embd=32, n_layer=1, n_head=2, multi_query=True
    )


def opt():
    import transformers as t

    return _decoder(
        t.OPTConfig,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=32,
    )


def llama():
    import transformers as t

    return _decoder(t.LlamaConfig, **LLAMA_SIZES)


def mistral():
    import transformers as t

    return _decoder(t.MistralConfig, **LLAMA_SIZES)


def qwen2():
    import transformers as t

    return _decoder(t.Qwen2Config, **LLAMA_SIZES)


def gemma():
    import transformers as t

    return _decoder(t.GemmaConfig, head_dim=16, **LLAMA_SIZES)


def phi():
    import transformers as t

    return _decoder(t.PhiConfig, partial_rotary_factor=0.5, **LLAMA_SIZES)


def falcon():
    import transformers as t

    return _decoder(
        t.FalconConfig,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        new_decoder_architecture=False,
        multi_query=True,
        alibi=False,
    )


def bloom():
    import transformers as t

    return _decoder(t.BloomConfig, hidden_size=32, n_layer=1, n_head=2)


# speech ----------------------------------------------------------------------------------------
SPEECH_SIZES = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (16, 16),
    "conv_stride": (5, 4),
    "conv_kernel": (10, 8),
    "num_conv_pos_embeddings": 8,
    "num_conv_pos_embedding_groups": 4,
    "vocab_size": 12,
}


def wav2vec2():
    import transformers as t

    return _built(t.Wav2Vec2ForCTC, t.Wav2Vec2Config(**SPEECH_SIZES))


def hubert():
    import transformers as t

    return _built(t.HubertForCTC, t.HubertConfig(**SPEECH_SIZES))


def whisper_encoder():
    import transformers as t

    config = t.WhisperConfig(
        num_mel_bins=16,
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        max_source_positions=16,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(0)
    return randomize_zeros(t.WhisperModel(_eager(config)).get_encoder().eval())


ZOO: dict[str, ZooModel] = {
    "resnet": ZooModel("image", resnet, images),
    "resnet-bottleneck": ZooModel("image", resnet_bottleneck, images),
    "mobilenet_v1": ZooModel("image", mobilenet_v1, images),
    "mobilenet_v2": ZooModel("image", mobilenet_v2, images),
    "efficientnet": ZooModel("image", efficientnet, images),
    "convnext": ZooModel("image", convnext, images),
    "convnextv2": ZooModel("image", convnextv2, images),
    "regnet": ZooModel("image", regnet, images),
    "bit": ZooModel("image", bit, images),
    "vit": ZooModel("image", vit, images),
    "deit": ZooModel("image", deit, images),
    "beit": ZooModel("image", beit, images),
    "dinov2": ZooModel("image", dinov2, images),
    "swin": ZooModel("image", swin, images),
    "segformer": ZooModel("image", segformer, images),
    "poolformer": ZooModel("image", poolformer, images),
    "bert": ZooModel("text encoder", bert, tokens),
    "roberta": ZooModel("text encoder", roberta, tokens),
    "electra": ZooModel("text encoder", electra, tokens),
    "distilbert": ZooModel("text encoder", distilbert, tokens),
    "albert": ZooModel("text encoder", albert, tokens),
    "deberta-v2": ZooModel("text encoder", deberta_v2, tokens),
    "mobilebert": ZooModel("text encoder", mobilebert, tokens),
    "t5-encoder": ZooModel("text encoder", t5_encoder, tokens),
    "gpt2": ZooModel("decoder", gpt2, tokens),
    "gpt_bigcode": ZooModel("decoder", gpt_bigcode, tokens),
    "opt": ZooModel("decoder", opt, tokens),
    "llama": ZooModel("decoder", llama, tokens),
    "mistral": ZooModel("decoder", mistral, tokens),
    "qwen2": ZooModel("decoder", qwen2, tokens),
    "gemma": ZooModel("decoder", gemma, tokens),
    "phi": ZooModel("decoder", phi, tokens),
    "falcon": ZooModel("decoder", falcon, tokens),
    "bloom": ZooModel("decoder", bloom, tokens),
    "wav2vec2": ZooModel("speech", wav2vec2, audio),
    "hubert": ZooModel("speech", hubert, audio),
    "whisper-encoder": ZooModel("speech", whisper_encoder, mel),
}
