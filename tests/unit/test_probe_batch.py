"""The probe batch of a large model (``engine.calibration.probe``): which batches are cut to
their first tokens; the whole run on such a model is in test_large_models."""

from __future__ import annotations

import pytest
import torch

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
