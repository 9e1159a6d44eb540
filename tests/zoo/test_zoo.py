"""Every zoo model (torchvision's structures re-typed, transformers from configs) through the
whole flow at small sizes: PTQ, the report's per-layer output SQNR against copied-hook
measurements (``layer_outputs``), INT8 export, the fusion table (every quantized layer, add,
concat and pool with its kernel or the reason it stays FP32), and the exported graph against
the simulation (ONNX Runtime without graph optimizations runs each QDQ node as written, so this
holds on any CPU; the fused kernels' speed is measured in tests/benchmarks/bench_zoo_vs_ort.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import workbench as wb
from tests.parity_bounds import assert_within_quantization_error
from workbench.runtime.export_inputs import flatten_outputs
from workbench.runtime.ort_session import make_session, run_session

from . import text, vision
from .layer_outputs import check_report_against_hooks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@dataclass
class Case:
    build: Callable[[], torch.nn.Module]
    data: Callable[[int], list]  # seed -> batches
    residual_adds: bool = False  # every residual connection of the structure on QLinearAdd
    integer_concats: int = 0
    float_ops: tuple[str, ...] = ()  # op kinds expected in FP32 (each with its reason)


def _images(size: int) -> Callable[[int], list]:
    return lambda seed: vision.images(1, size, batch=2, seed=seed)


def _decoder_tokens(seed: int) -> list[dict]:
    return text.tokens(1, seed=seed, vocab=text.DECODER_VOCAB)


def _residual_connections(model: torch.nn.Module) -> int:
    """Residual adds the structure has: one per ResNet block, one per inverted residual block
    that keeps its shape (torchvision's ``use_res_connect``)."""
    blocks = (vision.BasicBlock, vision.Bottleneck)
    return sum(
        isinstance(m, blocks) or bool(getattr(m, "use_res_connect", False)) for m in model.modules()
    )


CASES = {
    "resnet18": Case(lambda: vision.resnet18(0.125, 32, 10), _images(32), residual_adds=True),
    "resnet50": Case(lambda: vision.resnet50(0.125, 32, 10), _images(32), residual_adds=True),
    "mobilenet_v2": Case(
        lambda: vision.mobilenet_v2(0.25, 32, 10), _images(32), residual_adds=True
    ),
    "mobilenet_v3_small": Case(
        lambda: vision.mobilenet_v3_small(0.25, 32, 10), _images(32), residual_adds=True
    ),
    "efficientnet_b0": Case(
        lambda: vision.efficientnet_b0(0.5, 32, 10), _images(32), residual_adds=True
    ),
    "vgg11": Case(lambda: vision.vgg11(0.125, 224, 10, hidden=64), _images(224)),
    "densenet_block": Case(vision.densenet_block, _images(32), integer_concats=5),
    "small_unet": Case(vision.small_unet, _images(32), float_ops=("concat",)),
    "bert": Case(text.bert, lambda seed: text.tokens(1, seed=seed), float_ops=("add",)),
    "distilbert": Case(text.distilbert, lambda seed: text.tokens(1, seed=seed), float_ops=("add",)),
    "vit": Case(text.vit, _images(32), float_ops=("add",)),
    "gpt2": Case(text.gpt2, _decoder_tokens, float_ops=("add",)),
    "llama": Case(text.llama, _decoder_tokens, float_ops=("add", "mul")),
    "opt": Case(text.opt, _decoder_tokens, float_ops=("add",)),
}


def _first_output(model, batch) -> np.ndarray:
    args, kwargs = (batch,), {}
    if isinstance(batch, dict):
        args, kwargs = (), batch
    with torch.no_grad():
        return flatten_outputs(model(*args, **kwargs))[0][1].numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_model_quantizes_exports_and_fuses(name, tmp_path):
    case = CASES[name]
    model = case.build()
    result = wb.ptq(model, case.data(1), progress=False)
    # the report's per-layer output SQNR is what each layer produced (copies, whatever in-place
    # ops the structure runs afterwards: the shared ReLU(inplace=True), out += identity)
    assert check_report_against_hooks(model, result, case.data(1)) > 0
    example = case.data(2)[0]
    path = result.export_onnx(tmp_path / f"{name}.onnx", example, check_fusion=False)

    fusion = result.fusion(path, warn=False)
    assert fusion.unfused == [], fusion.table
    assert fusion.unfused_ops == [], fusion.ops
    ops = fusion.ops
    fused = ops[ops["fused"].astype(bool)]
    excitations = sum(isinstance(m, vision.SqueezeExcitation) for m in model.modules())
    assert (fused["kind"] == "mul").sum() == excitations, ops  # scale * x on QLinearMul
    adds = _residual_connections(model) if case.residual_adds else 0
    assert adds > 0 or not case.residual_adds
    assert (fused["kind"] == "add").sum() == adds, ops
    assert (fused["kind"] == "concat").sum() == case.integer_concats, ops
    assert (ops["fused"].astype(bool) == (ops["kernel"] != "")).all()
    assert (ops.loc[~ops["fused"].astype(bool), "reason"] != "").all()
    for kind in case.float_ops:
        rows = ops[ops["kind"] == kind]
        assert len(rows) and not rows["fused"].any()
        assert rows["reason"].str.contains("not quantized").all()

    session = make_session(path, 1, optimize=False)
    batch = case.data(3)[0]
    simulated = _first_output(result.model, batch).ravel().astype(np.float64)
    exported = run_session(session, batch)[0].ravel().astype(np.float64)
    fp32 = _first_output(result.fp32_model, batch)
    # ONNX Runtime sums in its own order: a bound from the quantization step (parity_bounds)
    assert_within_quantization_error(exported, simulated, fp32)
