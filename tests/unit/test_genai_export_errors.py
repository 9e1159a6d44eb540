"""``export_genai`` refuses what onnxruntime-genai's builder cannot take before running it."""

from __future__ import annotations

import pytest
import torch
from decoder_lm_models import small_tokenizer, tiny_llama, token_batches

import workbench as wb


def test_a_family_the_builder_does_not_take_names_the_ones_it_does(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=264, n_embd=64, n_layer=1, n_head=4)).eval()
    res = wb.ptq(
        gpt2, token_batches(), config=wb.QuantConfig.preset("int4-weight-g32"), progress=False
    )
    with pytest.raises(wb.ExportError, match="LlamaForCausalLM, MistralForCausalLM"):
        res.export_genai(tmp_path / "out", small_tokenizer())
    assert not any(tmp_path.iterdir())


def test_the_folder_needs_a_tokenizer(tmp_path):
    res = wb.ptq(
        tiny_llama(),
        token_batches(),
        config=wb.QuantConfig.preset("int4-weight-g32"),
        progress=False,
    )
    with pytest.raises(wb.ExportError, match="tokenizer="):
        res.export_genai(tmp_path / "out")
    assert not any(tmp_path.iterdir())


def test_a_failing_builder_is_one_export_error_and_leaves_nothing(tmp_path, monkeypatch):
    import subprocess

    from workbench.runtime import genai_export

    def failing_builder(checkpoint, output, cache, extra_options):
        assert (checkpoint / "config.json").exists()  # our checkpoint was handed over
        (output / "model.onnx").write_bytes(b"partial")
        return subprocess.CompletedProcess([], 1, "", "Traceback ...\nValueError: no such op")

    monkeypatch.setattr(genai_export, "run_builder", failing_builder)
    config = wb.QuantConfig.preset("int4-weight-g32")
    res = wb.ptq(tiny_llama(), token_batches(), config=config, progress=False)
    with pytest.raises(wb.ExportError, match=r"builder failed.*no such op"):
        res.export_genai(tmp_path / "out", small_tokenizer())
    assert not any(tmp_path.iterdir())
