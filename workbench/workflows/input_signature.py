"""What the model was calibrated on (each input's name, per-sample shape and dtype), so that
an export or benchmark input that does not fit is one clear error before any tracing.

Training-only keyword inputs (``labels``, ``engine.calibration.batches.TRAINING_ONLY_INPUTS``) are
not
part of it: batches that carry them (Hugging Face's training convention) calibrate and train
the model, and the export takes an example of the inference inputs only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workbench.engine.calibration.batches import TRAINING_ONLY_INPUTS, model_inputs
from workbench.errors import CalibrationError


@dataclass(frozen=True)
class InputSpec:
    """One model input of the calibration batches; ``sample_shape`` leaves out the batch."""

    name: str
    sample_shape: tuple[int, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        dims = ", ".join(["N", *map(str, self.sample_shape)])
        return f"[{dims}] {str(self.dtype).removeprefix('torch.')}"


def input_signature(batch: Any) -> tuple[InputSpec, ...]:
    """The inputs a calibration batch gives the model (tensors only)."""
    args, kwargs = model_inputs(batch)
    named = [(f"input {i}", v) for i, v in enumerate(args)] + list(kwargs.items())
    return tuple(
        InputSpec(name, tuple(value.shape[1:]), value.dtype)
        for name, value in named
        if isinstance(value, torch.Tensor) and value.dim() > 0 and name not in TRAINING_ONLY_INPUTS
    )


def is_token_input(spec: InputSpec) -> bool:
    """An integer ``[N, sequence]`` input (token ids, attention mask, positions)."""
    return len(spec.sample_shape) == 1 and not spec.dtype.is_floating_point


def check_like_calibration(
    signature: tuple[InputSpec, ...] | None, example_input: Any, free_sequence: bool = False
) -> None:
    """A ``CalibrationError`` when ``example_input`` differs from the calibration batches in
    an input's per-sample shape or dtype (the batch size may differ; with ``free_sequence``
    the sequence length of integer ``[N, sequence]`` inputs too, as a decoder's)."""
    if not signature:
        return
    args, kwargs = model_inputs(example_input)
    if not all(isinstance(v, torch.Tensor) for v in (*args, *kwargs.values())):
        return  # the export names the input that is not a tensor
    given = {spec.name: spec for spec in input_signature(example_input)}
    for spec in signature:
        got = given.get(spec.name)
        if got is None:
            raise CalibrationError(
                f"example_input gives no {spec.name} ({spec.describe()}), which the "
                "calibration batches gave; pass one batch shaped like them"
            )
        same_shape = got.sample_shape == spec.sample_shape or (
            free_sequence and is_token_input(spec) and is_token_input(got)
        )
        if not same_shape or got.dtype != spec.dtype:
            raise CalibrationError(
                f"example_input's {spec.name} is {got.describe()}, the model was calibrated "
                f"on {spec.describe()}; pass one batch shaped like the calibration data "
                "(e.g. x.float() for float32)"
            )
