"""The outlier BERT has what it is built for: a few activation channels far wider than the
rest at the Linears after each LayerNorm, enough to make static per-tensor minmax W8A8 lose
output cosine, which the same model without the outliers keeps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import workbench as wb

from .outlier_bert import outlier_bert, outlier_tokens

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _output_cosine(model, quantized, batch) -> float:
    with torch.no_grad():
        expected = model(**batch).last_hidden_state.flatten()
        got = quantized(**batch).last_hidden_state.flatten()
    return float(F.cosine_similarity(expected, got, dim=0))


def test_outlier_channels_are_the_widest_inputs_of_every_query():
    model = outlier_bert()
    widths: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, inputs, output):
            widths[name] = inputs[0].abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0)

        return hook

    for index, block in enumerate(model.encoder.layer):
        block.attention.self.query.register_forward_hook(record(f"query{index}"))
        block.intermediate.dense.register_forward_hook(record(f"ffn{index}"))
    with torch.no_grad():
        model(**outlier_tokens(1)[0])
    channels = model.config.outlier_channels
    assert len(channels) == 4
    for name, width in widths.items():
        others = torch.ones_like(width, dtype=torch.bool)
        others[channels] = False
        assert float(width[channels].min()) > 10 * float(width[others].median()), name


def test_static_minmax_int8_degrades_on_the_outliers_only():
    calib, test = outlier_tokens(4), outlier_tokens(1, seed=5)[0]
    with_outliers = outlier_bert()
    without = outlier_bert(outlier_scales=(1.0, 1.0, 1.0, 1.0))
    cosines = {}
    for label, model in (("outliers", with_outliers), ("plain", without)):
        result = wb.ptq(model, calib, config="int8", progress=False)
        cosines[label] = _output_cosine(model, result.model, test)
    assert cosines["outliers"] < 0.99, cosines
    assert cosines["plain"] > 0.995, cosines


def test_seeded():
    first, second = outlier_bert(seed=3), outlier_bert(seed=3)
    assert first.config.outlier_channels == second.config.outlier_channels
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert outlier_bert(seed=4).config.outlier_channels != first.config.outlier_channels
