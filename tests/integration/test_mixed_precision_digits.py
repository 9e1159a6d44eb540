"""Accuracy-driven mixed precision on the digits CNN, and sensitivity on a BERT with outliers."""

from __future__ import annotations

import torch

import workbench as wb


def assert_bits(res: wb.QuantResult, low_bits: int) -> None:
    """Kept layers are 8-bit and say so; every other quantized layer has the config's bits."""
    kept = res.report.summary["kept_higher_precision"]
    layers = res.report.layers.set_index("layer")
    quantized = layers[layers["status"] == "quantized"]
    assert set(kept) <= set(quantized.index)
    for name, row in quantized.iterrows():
        if name in kept:
            assert row["bits"] == 8 and "kept 8-bit" in row["reason"], (name, row["reason"])
            assert row["precision"] == "kept 8-bit"
            assert row["weight_bits"] == 8 and row["activation_bits"] == 8
        else:
            assert row["bits"] == low_bits, (name, row["bits"])
            assert row["precision"] == "quantized"
    plan_bits = {plan.name: plan.kept_bits for plan in res.plans if plan.kept_bits is not None}
    assert plan_bits == dict.fromkeys(kept, 8)  # the plan says it as a field too
    assert res.report.summary["budget_met"] is (res.report.summary["metric_drop"] <= 0.5)


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
    assert summary["metric_drop"] <= 0.5
    assert len(summary["kept_higher_precision"]) <= summary["layers_quantized"] / 3
    assert_bits(res, 4)


def test_digits_2bit_search_must_keep_layers_in_8_bit(digits_model, digits_data, digits_eval_fn):
    # 2-bit weights (4 codes per channel) cost PTQ tens of points: the search has to keep
    # layers, and must not need all of them
    config = wb.QuantConfig(weight=wb.Scheme(2, True, True))
    plain = wb.ptq(
        digits_model,
        digits_data.calib_batches(),
        config=config,
        eval_fn=digits_eval_fn,
        progress=False,
    )
    assert plain.report.summary["metric_drop"] > 5.0
    res = wb.auto_mixed_precision(
        digits_model,
        digits_data.calib_batches(),
        digits_eval_fn,
        max_drop=0.5,
        config=config,
        progress=False,
    )
    summary = res.report.summary
    kept = summary["kept_higher_precision"]
    assert summary["metric_drop"] <= 0.5
    assert 1 <= len(kept) < summary["layers_quantized"]
    assert_bits(res, 2)
    int8 = wb.ptq(digits_model, digits_data.calib_batches(), config="int8", progress=False)
    assert summary["quantized_bytes"] < int8.report.summary["quantized_bytes"]


def test_bert_sensitivity_ranks_scaled_layers_first():
    import transformers

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
