"""``QuantResult.save_pretrained``: a Hugging Face GPTQ checkpoint, unpacked here by a small
numpy reader written from the format's definition (AutoGPTQ / optimum "gptq" v1), never by
our writer, and compared with the simulation's codes, scales and weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from decoder_lm_models import small_tokenizer, tiny_llama, token_batches
from safetensors.numpy import load_file

import workbench as wb
from workbench.engine.placement.layers import iter_quantized_layers


def unpack_int32(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Each int32 holds 32/bits values along ``axis``, the first in the low bits."""
    per = 32 // bits
    w = words.astype(np.int64) & 0xFFFFFFFF
    shifts = np.arange(per) * bits
    if axis == 0:
        values = (w[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)
        return values.reshape(-1, words.shape[1])
    values = (w[:, :, None] >> shifts[None, None, :]) & (2**bits - 1)
    return values.reshape(words.shape[0], -1)


def read_layer(tensors: dict, name: str, bits: int):
    """``W [out, in]``, the unsigned codes ``[in, out]``, zero points and scales ``[G, out]``."""
    q = unpack_int32(tensors[f"{name}.qweight"], bits, axis=0)
    zeros = (unpack_int32(tensors[f"{name}.qzeros"], bits, axis=1) + 1) & (2**bits - 1)
    scales = tensors[f"{name}.scales"].astype(np.float64)
    g_idx = tensors[f"{name}.g_idx"]
    weight = scales[g_idx] * (q - zeros[g_idx])
    return weight.T, q, zeros, scales, g_idx


def quantize(model, method="gptq", act_order=False, symmetric=True, group_size=32, **kw):
    config = wb.QuantConfig(
        weight=wb.Scheme(4, symmetric, True, 0, group_size=group_size),
        activation=None,
        weight_method=method,
        gptq_act_order=act_order,
        **kw,
    )
    return wb.ptq(model, token_batches(), config=config, progress=False)


@pytest.mark.parametrize(
    "method,act_order,symmetric,group_size",
    [
        ("gptq", False, True, 32),
        ("gptq", True, False, 32),
        ("nearest", False, True, None),
        ("nearest", False, False, 64),
    ],
)
def test_checkpoint_unpacks_to_the_simulation(tmp_path, method, act_order, symmetric, group_size):
    model = tiny_llama()
    res = quantize(model, method, act_order, symmetric, group_size)
    path = res.save_pretrained(tmp_path / "ckpt", small_tokenizer())
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4
    assert qc["group_size"] == (group_size or -1)
    assert qc["sym"] is symmetric and qc["desc_act"] is act_order
    assert config["architectures"] == ["LlamaForCausalLM"]
    tensors = load_file(str(path / "model.safetensors"))
    layers = dict(iter_quantized_layers(res.model))
    for name, layer in layers.items():
        assert f"{name}.weight" not in tensors
        weight, q, zeros, scales, g_idx = read_layer(tensors, name, 4)
        simulated = layer.quantized_weight().detach().double().numpy()
        step = np.repeat(scales.T, group_size or simulated.shape[1], axis=1)
        # the checkpoint's weight is the simulation's up to float rounding of s * (q - z)
        np.testing.assert_allclose(weight, simulated, rtol=0, atol=1e-6 * step.max())
        assert np.array_equal(g_idx, np.arange(simulated.shape[1]) // (group_size or 10**9))
        if symmetric:
            assert (zeros == 8).all()  # signed codes stored with offset 2^(b-1)
        codes = getattr(layer.weight_quantizer, "codes", None)
        if codes is not None:  # GPTQ keeps its codes: the same integers, shifted unsigned
            offset = 8 if symmetric else 0
            assert np.array_equal(q.T, codes.numpy().astype(np.int64) + offset)
            sim_scale = layer.weight_quantizer.scale.numpy()
            np.testing.assert_array_equal(scales.T.astype(np.float32), sim_scale)
    # every unquantized tensor is the model's own
    state = res.fp32_model.state_dict()
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        np.testing.assert_array_equal(tensors[key], state[key].numpy())
    assert (path / "tokenizer.json").exists()


def test_checkpoint_loads_back_into_transformers_weights(tmp_path):
    """The unpacked weights in a plain LlamaForCausalLM give the simulation's logits."""
    model = tiny_llama()
    res = quantize(model, "gptq", True, True, 32)
    path = res.save_pretrained(tmp_path / "ckpt")
    tensors = load_file(str(path / "model.safetensors"))
    plain = tiny_llama(seed=1)
    state = plain.state_dict()
    for name in dict(iter_quantized_layers(res.model)):
        state[f"{name}.weight"] = torch.from_numpy(read_layer(tensors, name, 4)[0]).float()
    for key, value in tensors.items():
        if key in state:
            state[key] = torch.from_numpy(value)
    plain.load_state_dict(state)
    ids = token_batches(1, 2, 12, seed=5)[0]
    with torch.no_grad():
        expected = res.model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_untouched_model_and_fp32_head(tmp_path):
    model = tiny_llama(tie=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = quantize(model, "nearest", quantize_lm_head=False)
    path = res.save_pretrained(tmp_path / "ckpt")
    tensors = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["lm_head"] is False
    assert "lm_head.qweight" not in tensors
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_what_the_format_cannot_hold_is_an_export_error(tmp_path):
    model = tiny_llama()
    int8 = wb.ptq(model, token_batches(), config=wb.QuantConfig.preset("int8"), progress=False)
    with pytest.raises(wb.ExportError, match="weights only"):
        int8.save_pretrained(tmp_path / "a")
    three_bit = wb.ptq(
        model,
        token_batches(),
        config=wb.QuantConfig(weight=wb.Scheme(3, True, True, 0, group_size=32), activation=None),
        progress=False,
    )
    with pytest.raises(wb.ExportError, match=r"\(2, 4, 8\) bits"):
        three_bit.save_pretrained(tmp_path / "b")
    partial = quantize(model, "nearest", exclude=("model.layers.0.mlp.up_proj",))
    with pytest.raises(wb.ExportError, match="only the LM head may stay FP32"):
        partial.save_pretrained(tmp_path / "c")
    cnn = wb.ptq(
        torch.nn.Sequential(torch.nn.Linear(32, 32)),
        [torch.randn(4, 32)],
        config=wb.QuantConfig.preset("int4-weight-g32"),
        progress=False,
    )
    with pytest.raises(wb.ExportError, match="no transformers config"):
        cnn.save_pretrained(tmp_path / "d")
    assert not any(tmp_path.iterdir())  # a failed call leaves no file behind


def test_a_tokenizer_whose_end_token_is_no_logit_row_is_refused(tmp_path):
    """An end token at id == vocab_size: ONNX Runtime GenAI's generator would refuse to start."""
    tokenizer = small_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|end|>"})  # id 264: no row of the logits
    res = quantize(tiny_llama(), "nearest")
    with pytest.raises(wb.ExportError, match="eos_token_id is 264"):
        res.save_pretrained(tmp_path / "ckpt", tokenizer)
    assert not any(tmp_path.iterdir())
