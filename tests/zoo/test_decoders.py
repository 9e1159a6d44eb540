"""Causal language models from transformers configs (GPT-2 with its Conv1D projections, LLaMA,
OPT; 2 layers, hidden 64, vocabulary 256), called as ``AutoModelForCausalLM`` models with
``input_ids`` and ``attention_mask``: PTQ, the report, the export without the key/value cache,
ONNX Runtime's fusion and ORT against the simulation; the LM head option with tied weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import workbench as wb
from tests.parity_bounds import assert_parity_within_quantization_error
from workbench.engine.placement.layers import QuantizedEmbedding, QuantizedLayer
from workbench.errors import ConfigError

from . import text

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DECODERS = {"gpt2": text.gpt2, "llama": text.llama, "opt": text.opt}
TOKEN_TABLES = {
    "gpt2": "transformer.wte",
    "llama": "model.embed_tokens",
    "opt": "model.decoder.embed_tokens",
}


def data(seed: int, count: int = 2) -> list[dict]:
    return text.tokens(count, seed=seed, vocab=text.DECODER_VOCAB)


def initializers(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def per_row_fake_quant(table: torch.Tensor) -> torch.Tensor:
    """The int8 per-channel symmetric rows of a table, by PyTorch's own kernel."""
    scale = table.abs().amax(dim=1) / 127
    zero = torch.zeros(table.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(table, scale, zero, 0, -127, 127)


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_int8_with_embeddings_exports_fuses_and_matches_ort(name, tmp_path, ort_exact_int8):
    model = DECODERS[name]()
    config = wb.QuantConfig.preset("int8", weight=ort_exact_int8.weight, quantize_embeddings=True)
    result = wb.ptq(model, data(1), config=config, progress=False)
    layers = result.report.layers.set_index("layer")
    linear_types = {"Linear", "Conv1D"}
    linears = layers[layers["type"].isin(linear_types)]
    assert len(linears) == 2 * (7 if name == "llama" else 4 if name == "gpt2" else 6) + 1
    assert (linears["status"] == "quantized").all(), linears["reason"]
    assert layers.loc[TOKEN_TABLES[name], "status"] == "quantized"
    if name == "opt":  # OPT's positions look rows up from the attention mask: kept FP32
        assert layers.loc["model.decoder.embed_positions", "status"] == "fp32"
        assert "own forward" in layers.loc["model.decoder.embed_positions", "reason"]

    assert model.config.use_cache  # the export turns the cache off, then back on
    path = result.export_onnx(tmp_path / f"{name}.onnx", data(2)[0], check_fusion=False)
    assert [output.name for output in onnx.load(str(path)).graph.output] == ["logits"]
    assert result.model.config.use_cache and model.config.use_cache

    fusion = result.fusion(path, warn=False)
    assert fusion.unfused == [], fusion.table
    assert set(fusion.table["layer"]) == set(linears.index)
    parity = result.parity(path, data(3)).table.iloc[0]
    assert parity["output"] == "logits"
    assert_parity_within_quantization_error(parity)
    assert parity["cosine_ort_vs_fp32"] >= 0.99


# OPT runs fc1 / fc2 on 2-D inputs: their bias is exported as Sub(-b) so that ONNX Runtime's
# MatMulAddFusion does not turn them into FP32 Gemms before they can become MatMulNBits
@pytest.mark.parametrize("preset", ["int8-weight-only", "int4-weight-g32"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_weight_only_runs_every_linear_on_matmulnbits(name, preset, tmp_path):
    config = wb.QuantConfig.preset(preset, quantize_embeddings=preset.startswith("int4"))
    result = wb.ptq(DECODERS[name](), data(1), config=config, progress=False)
    path = result.export_onnx(tmp_path / f"{name}.onnx", data(2)[0], check_fusion=False)
    fusion = result.fusion(path, warn=False)
    assert fusion.unfused == [], fusion.table
    assert (fusion.table["kernel"] == "MatMulNBits").all(), fusion.table
    layers = result.report.layers
    linears = layers[layers["type"].isin({"Linear", "Conv1D"})]
    assert set(fusion.table["layer"]) == set(linears["layer"])
    # MatMulNBits at accuracy level 4 quantizes its input to int8 per block: close, not exact
    parity = result.parity(path, data(3)).table.iloc[0]
    assert parity["cosine"] >= 0.999, parity


def test_tied_head_and_token_table_are_quantized_independently(tmp_path):
    model = text.gpt2()
    wte = model.transformer.wte.weight.detach().clone()
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties them
    ids = data(4, 1)[0]["input_ids"]

    # the table quantized, the head FP32: lookups give int8 rows, the head reads FP32 weights
    config = wb.QuantConfig.preset("int8", quantize_embeddings=True, quantize_lm_head=False)
    result = wb.ptq(model, data(1), config=config, progress=False)
    layers = result.report.layers.set_index("layer")
    assert layers.loc["lm_head", "status"] == "fp32"
    assert layers.loc["lm_head", "reason"] == "LM head kept FP32 by config (quantize_lm_head=False)"
    quantized = result.model
    assert isinstance(quantized.transformer.wte, QuantizedEmbedding)
    assert not isinstance(quantized.lm_head, QuantizedLayer)
    assert torch.equal(quantized.lm_head.weight, wte)
    with torch.no_grad():
        torch.testing.assert_close(quantized.transformer.wte(ids), per_row_fake_quant(wte)[ids])
    path = result.export_onnx(tmp_path / "table.onnx", data(2)[0], check_fusion=False)
    inits = initializers(path)
    assert inits["transformer.wte.weight_quantized"].dtype == np.int8
    fp32_heads = [a for a in inits.values() if a.dtype == np.float32 and a.size == wte.numel()]
    assert len(fp32_heads) == 1  # the head's FP32 matrix, stored once

    # the head quantized (the default), the table FP32: lookups give the FP32 rows
    result = wb.ptq(model, data(1), config="int8-weight-only", progress=False)
    quantized = result.model
    assert isinstance(quantized.lm_head, QuantizedLayer)
    assert not isinstance(quantized.transformer.wte, QuantizedEmbedding)
    with torch.no_grad():
        assert torch.equal(quantized.transformer.wte(ids), wte[ids])
        torch.testing.assert_close(quantized.lm_head.quantized_weight(), per_row_fake_quant(wte))
    # the FP32 model stores the tied matrix once
    storage = result.report.storage.set_index("layer")
    unique = {id(p): p.numel() for p in model.parameters()}
    assert storage.loc["TOTAL", "fp32_bytes"] == 4 * sum(unique.values())
    assert torch.equal(model.transformer.wte.weight, wte)  # the user's model is untouched


def test_quantize_lm_head_false_needs_a_model_with_a_head():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    config = wb.QuantConfig(quantize_lm_head=False)
    with pytest.raises(ConfigError, match="no LM head"):
        wb.ptq(model, [torch.randn(4, 8)], config=config, progress=False)
    with pytest.raises(ConfigError, match="quantize_lm_head must be True or False"):
        wb.QuantConfig(quantize_lm_head="no")
