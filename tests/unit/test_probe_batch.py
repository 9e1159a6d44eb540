"""A large model's passes that only find layers run on the first tokens of its first batch
(``engine.calibration.probe``); what they find, and so the result, is the same."""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench.engine.calibration import probe
from workbench.engine.calibration.probe import PROBE_TOKENS, probe_batch

LARGE = probe.PROBE_MODEL_BYTES


def _ids(length: int, batch: int = 2) -> dict:
    return {
        "input_ids": torch.randint(0, 128, (batch, length)),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
    }


def test_token_batches_of_large_models_are_cut_to_their_first_tokens():
    batch = _ids(4 * PROBE_TOKENS)
    cut = probe_batch(batch, LARGE)
    assert cut["input_ids"].shape == (2, PROBE_TOKENS)
    assert torch.equal(cut["input_ids"], batch["input_ids"][:, :PROBE_TOKENS])
    assert torch.equal(cut["attention_mask"], batch["attention_mask"][:, :PROBE_TOKENS])
    assert probe_batch((batch["input_ids"],), LARGE)[0].shape == (2, PROBE_TOKENS)


@pytest.mark.parametrize(
    "batch",
    [
        torch.randn(2, 64),  # features, not tokens
        {"input_ids": torch.zeros(2, 64, dtype=torch.long), "mask": torch.ones(2, 32).long()},
        torch.zeros(2, 3, 64, dtype=torch.long),
        torch.zeros(2, PROBE_TOKENS, dtype=torch.long),  # already short
    ],
    ids=["float", "two_shapes", "3d", "short"],
)
def test_other_batches_are_used_as_they_are(batch):
    assert probe_batch(batch, LARGE) is batch


def test_small_models_use_the_whole_batch():
    batch = _ids(64)
    assert probe_batch(batch, LARGE - 1) is batch


def test_a_large_model_probes_on_its_first_tokens_with_the_same_result(monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    torch.manual_seed(1)
    batches = [_ids(4 * PROBE_TOKENS, batch=1) for _ in range(2)]
    lengths: list[int] = []
    model.model.embed_tokens.register_forward_pre_hook(
        lambda _m, inputs: lengths.append(inputs[0].shape[-1])
    )
    whole = wb.ptq(model, batches, config="int4-weight-g32", progress=False)
    whole_lengths, lengths[:] = list(lengths), []
    monkeypatch.setattr(probe, "PROBE_MODEL_BYTES", 0)
    probed = wb.ptq(model, batches, config="int4-weight-g32", progress=False)
    assert PROBE_TOKENS in lengths and PROBE_TOKENS not in whole_lengths
    assert len(lengths) == len(whole_lengths)  # the same passes, shorter
    columns = ["layer", "status", "weight_sqnr_db", "output_sqnr_db", "layer_sqnr_db"]
    assert probed.report.layers[columns].equals(whole.report.layers[columns])
    with torch.no_grad():
        assert torch.equal(probed.model(**batches[0]).logits, whole.model(**batches[0]).logits)
