"""PTQ of a randomly initialised 4-layer BERT built from a transformers config (no download)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import workbench as wb
from workbench.engine.placement.layers import QuantizedLayer

VOCAB = 1000


def random_token_batches(n: int, seed: int, batch: int = 8, length: int = 32) -> list[dict]:
    """Dicts of keyword inputs, as a tokenizer gives them; some rows padded."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        input_ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
        attention_mask = torch.ones(batch, length, dtype=torch.long)
        lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
        for row, kept in enumerate(lengths.tolist()):
            attention_mask[row, kept:] = 0
            input_ids[row, kept:] = 0
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        vocab_size=VOCAB,
    )
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def quantized(bert):
    before = {k: v.detach().clone() for k, v in bert.state_dict().items()}
    probe = random_token_batches(1, seed=99)[0]
    with torch.no_grad():
        output_before = bert(**probe).last_hidden_state.clone()
    res = wb.ptq(bert, random_token_batches(8, seed=0), config="int8", progress=False)
    return res, before, probe, output_before


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_report_lists_every_linear_quantized(bert, quantized):
    res, *_ = quantized
    names = linear_names(bert)
    assert len(names) == 4 * 6 + 1  # q, k, v, attention out, intermediate, output; pooler
    layers = res.report.layers.set_index("layer")
    assert set(names) <= set(layers.index)
    assert (layers.loc[names, "status"] == "quantized").all()
    assert (layers.loc[names, "scheme"] == "int8 sym per-channel").all()
    assert (layers.loc[names, "output_cosine"] > 0.99).all()
    assert layers.loc["encoder.layer.0.attention.self.query", "num_scales"] == 128
    assert layers.loc["encoder.layer.0.intermediate.dense", "num_scales"] == 512
    kept = layers[layers["status"] == "fp32"]
    assert set(kept["type"]) == {"Embedding", "LayerNorm"}
    storage = res.report.storage.set_index("layer")
    assert storage.loc["TOTAL", "fp32_bytes"] == 4 * sum(p.numel() for p in bert.parameters())


def test_whole_model_cosine_on_random_token_batches(bert, quantized):
    res, *_ = quantized
    reference, approx = [], []
    with torch.no_grad():
        for batch in random_token_batches(4, seed=1):
            reference.append(bert(**batch).last_hidden_state.flatten())
            approx.append(res.model(**batch).last_hidden_state.flatten())
    reference, approx = torch.cat(reference), torch.cat(approx)
    cosine = float(nn.functional.cosine_similarity(reference, approx, dim=0))
    assert cosine >= 0.99
    assert not torch.equal(reference, approx)
    assert res.report.summary["model_output_cosine"] >= 0.99


def test_input_model_unchanged(bert, quantized):
    res, before, probe, output_before = quantized
    after = bert.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not bert.training
    assert not any(isinstance(m, QuantizedLayer) for m in bert.modules())
    assert set(linear_names(bert)) == set(linear_names(res.fp32_model))
    with torch.no_grad():
        assert torch.equal(bert(**probe).last_hidden_state, output_before)


def test_exclude_glob_on_bert(bert):
    config = wb.QuantConfig.preset("int8", exclude=("encoder.layer.*.output.dense", "pooler.*"))
    res = wb.ptq(bert, random_token_batches(2, seed=2), config=config, progress=False)
    layers = res.report.layers.set_index("layer")
    # fnmatch semantics: "*" also matches dots, so "attention.output.dense" matches as well
    excluded = [f"encoder.layer.{i}.output.dense" for i in range(4)]
    excluded += [f"encoder.layer.{i}.attention.output.dense" for i in range(4)]
    excluded += ["pooler.dense"]
    assert (layers.loc[excluded, "status"] == "fp32").all()
    assert (layers.loc[excluded, "reason"] == "excluded by config").all()
    assert layers.loc["encoder.layer.0.intermediate.dense", "status"] == "quantized"
    assert int((layers["status"] == "quantized").sum()) == 25 - 9
    for name in excluded:
        assert type(res.model.get_submodule(name)) is nn.Linear


def test_tokenizer_batch_encodings_as_calib_data(bert):
    """A tokenizer's output is a BatchEncoding (a Mapping, not a dict): one of them, or a list."""
    batches = [transformers.BatchEncoding(b) for b in random_token_batches(2, seed=3)]
    single = wb.ptq(bert, batches[0], progress=False)
    several = wb.ptq(bert, batches, progress=False)
    plain = wb.ptq(bert, [dict(b) for b in batches], progress=False)
    for res in (single, several):
        assert int((res.report.layers["status"] == "quantized").sum()) == 25
    name = "encoder.layer.0.attention.self.query"
    scale = float(several.model.get_submodule(name).input_quantizer.scale)
    assert scale == float(plain.model.get_submodule(name).input_quantizer.scale)
