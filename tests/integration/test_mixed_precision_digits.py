"""Accuracy-driven mixed precision on the digits CNN, and sensitivity on a BERT with outliers."""

from __future__ import annotations

import pytest
import torch

import workbench as wb


def test_digits_4bit_search_meets_the_drop_with_few_layers_kept(
    digits_model, digits_data, digits_eval_fn
):
    res = wb.auto_mixed_precision(
        digits_model,
        digits_data.calib_batches(),
        digits_eval_fn,
        max_drop=0.5,
        config="w4a4",
        progress=False,
    )
    summary = res.report.summary
    kept = summary["kept_higher_precision"]
    assert summary["metric_drop"] <= 0.5
    assert len(kept) <= summary["layers_quantized"] / 3
    layers = res.report.layers.set_index("layer")
    for name in kept:
        assert layers.loc[name, "bits"] == 8 and "kept 8-bit" in layers.loc[name, "reason"]
    plan_bits = {plan.name: plan.weight_bits for plan in res.plans if plan.weight_bits is not None}
    assert plan_bits == dict.fromkeys(kept, 8)  # the plan says it as a field too


def test_digits_3bit_search_keeps_layers_in_8_bit(digits_model, digits_data, digits_eval_fn):
    config = wb.QuantConfig(weight=wb.Scheme(3, True, True), activation=wb.Scheme(3, False))
    plain = wb.ptq(
        digits_model,
        digits_data.calib_batches(),
        config=config,
        eval_fn=digits_eval_fn,
        progress=False,
    )
    res = wb.auto_mixed_precision(
        digits_model,
        digits_data.calib_batches(),
        digits_eval_fn,
        max_drop=0.5,
        config=config,
        progress=False,
    )
    assert res.report.summary["metric_drop"] <= 0.5
    if plain.report.summary["metric_drop"] > 0.5:
        assert res.report.summary["kept_higher_precision"]
    assert res.report.summary["quantized_bytes"] < plain.report.summary["fp32_bytes"] / 4


def test_bert_sensitivity_ranks_scaled_layers_first():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=500,
        max_position_embeddings=64,
    )
    bert = transformers.BertModel(config).eval()
    scaled = ["encoder.layer.0.attention.self.value", "encoder.layer.1.intermediate.dense"]
    with torch.no_grad():
        for name in scaled:
            # one outlier weight per output channel sets each channel's 4-bit scale, and the
            # rest of the row collapses onto a few codes
            bert.get_submodule(name).weight[:, 0] *= 12.0
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 500, (4, 16))
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    table = wb.sensitivity(bert, batches, config="int4-weight", progress=False)
    assert set(table["layer"].head(2)) == set(scaled)
