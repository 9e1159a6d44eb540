"""Shared fixtures: the digits data and the demo CNN, trained once per test session."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "workbench",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("workbench")

# The test models are tiny: intra-op threads buy nothing there, and on a busy 2-core machine
# two threads per process made every forward pass 10-20x slower. Speed targets live in
# tests/benchmarks/, which set their own thread counts.
torch.set_num_threads(1)


def ort_exact_weight_bits() -> int:
    """Weight width at which ONNX Runtime's integer kernels compute the simulation exactly on
    this CPU. Without VNNI (AVX2 / AVX-512 without VNNI, as on some AMD EPYC hosts), ORT's U8S8
    kernels add two u8 x s8 products in int16 with saturation (vpmaddubsw): with 8-bit weights
    the sum can pass 32767 and ORT's output leaves the simulation by many steps. 7-bit weights
    keep the sum in range (255 * 64 * 2 < 32768): the advice the CPU check gives users."""
    from workbench.runtime.cpu_features import detect_cpu_features

    cpu = detect_cpu_features()
    return 8 if cpu.vnni or cpu.amx or not (cpu.avx2 or cpu.avx512) else 7


def pytest_report_header(config) -> str:
    bits = ort_exact_weight_bits()
    if bits == 8:
        return "ONNX Runtime parity tests: 8-bit weights (this CPU's U8S8 kernels are exact)"
    return (
        f"ONNX Runtime parity tests: {bits}-bit weights (no VNNI: ORT's U8S8 kernels saturate "
        "int16 sums with 8-bit weights)"
    )


@pytest.fixture(scope="session")
def ort_exact_int8():
    """The ``int8`` preset with the weight width at which ORT computes the simulation exactly
    on this CPU (see ort_exact_weight_bits): for tests comparing ORT with the simulation."""
    import workbench as wb

    bits = ort_exact_weight_bits()
    return wb.QuantConfig.preset("int8", weight=wb.Scheme(bits=bits, per_channel=True))


@pytest.fixture(scope="session")
def digits_data():
    """sklearn's bundled digits split into train / test tensors (no download)."""
    from workbench.demo import load_digits_data

    return load_digits_data()


@pytest.fixture(scope="session")
def digits_model(digits_data):
    """The demo CNN trained on digits once for the whole session (a few seconds).

    Tests must not modify it: ``ptq`` deep-copies its input, and tests that check this
    compare its state_dict before and after.
    """
    from workbench.demo import train_digits_cnn

    torch.manual_seed(0)
    return train_digits_cnn(digits_data, epochs=8)


@pytest.fixture(scope="session")
def digits_eval_fn(digits_data):
    """Top-1 test accuracy in percent."""
    from workbench.demo import accuracy

    def eval_fn(model):
        return accuracy(model, digits_data.test_x, digits_data.test_y)

    return eval_fn


@pytest.fixture(scope="session")
def onnx_reference_top1(tmp_path_factory):
    """Top-1 accuracy (percent) of a result's exported INT8 ONNX model, computed with ONNX's
    reference implementation (NumPy): independent of the torch simulation, of ``eval_fn``
    and of any CPU's integer kernels. Its QuantizeLinear / DequantizeLinear start at opset 19,
    whose semantics for int8 / uint8 are those of opset 13-17, so the copy declares 19."""

    def top1_percent(result, images: torch.Tensor, labels: torch.Tensor) -> float:
        import onnx
        from onnx.reference import ReferenceEvaluator

        folder = tmp_path_factory.mktemp("onnx-reference")
        path = result.export_onnx(folder / "model.onnx", images[:1], check_fusion=False)
        model = onnx.load(str(path))
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, 19)
        feeds = {model.graph.input[0].name: images.numpy()}
        logits = ReferenceEvaluator(model).run(None, feeds)[0]
        return 100.0 * float((logits.argmax(axis=1) == labels.numpy()).mean())

    return top1_percent
