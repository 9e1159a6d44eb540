"""Large models: kept weight codes, shared weights, external data past 2 GB, block-by-block GPTQ.

The size thresholds (2 GiB for external data, 1 GiB for the report's sample, 256 MiB for the
block walk) are module constants; the tests lower them so that a small model takes the
large-model paths and the suite never writes gigabytes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from workbench.core import weight_codes as weight_codes_module
from workbench.core.fake_quant import fake_quantize
from workbench.core.weight_codes import weight_codes
from workbench.engine import blocks
from workbench.engine.algorithms import gptq as gptq_module
from workbench.engine.algorithms import gptq_layers
from workbench.engine.algorithms.gptq_layers import GPTQWeightQuantizer
from workbench.engine.calibration import probe
from workbench.engine.calibration.calibrate import calibrate, prepare_model
from workbench.engine.calibration.probe import PROBE_TOKENS
from workbench.engine.capture.model_copy import user_model_copy
from workbench.engine.placement.layers import iter_quantized_layers
from workbench.engine.quantizers import modules as modules_module
from workbench.engine.quantizers.modules import WeightQuantizer
from workbench.errors import ExportError
from workbench.runtime import external_data
from workbench.runtime.ort_session import make_session, run_session
from workbench.workflows import ptq as ptq_workflow

SCHEMES = [
    wb.Scheme(4, True, True, 0, group_size=32),
    wb.Scheme(4, False, True, 0, group_size=32),
    wb.Scheme(3, True, True, 0),
    wb.Scheme(8, True, True, 0),
    wb.Scheme(8, False, False),
    wb.Scheme(2, True, False),
]


@pytest.mark.parametrize("chunk_bytes", [None, 64], ids=["whole", "blocks_of_rows"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_kept_codes_dequantize_to_torch_fake_quant_bit_for_bit(scheme, chunk_bytes, monkeypatch):
    if chunk_bytes is not None:
        monkeypatch.setattr(weight_codes_module, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    weight = torch.randn(48, 200) * torch.rand(48, 1) * 3  # 200 inputs: a partial last group
    quantizer = WeightQuantizer(scheme)
    quantizer.freeze(weight)
    codes = weight_codes(weight, quantizer.scale, quantizer.zero_point, scheme)
    reference = fake_quantize(weight, quantizer.scale, quantizer.zero_point, scheme)
    assert torch.equal(codes.dequantize(), reference)
    q = codes.codes()
    assert int(q.min()) >= scheme.quant_min and int(q.max()) <= scheme.quant_max
    per_byte = 2 if scheme.bits <= 4 else 1
    assert codes.nbytes == -(-weight.numel() // per_byte)


@pytest.mark.parametrize("change", ["weight", "scale"])
def test_codes_are_computed_once_and_again_after_an_in_place_change(change):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(16, 64))
    quantizer = WeightQuantizer(wb.Scheme(4, True, True, 0, group_size=32))
    quantizer.freeze(weight)
    with torch.no_grad():
        first = quantizer(weight)
        kept = quantizer.codes_of(weight)
        assert quantizer(weight) is not first and quantizer.codes_of(weight) is kept
        assert kept.scale.data_ptr() == quantizer.scale.data_ptr()  # the qparams, not a copy
        if change == "weight":
            weight.mul_(0.5)
        else:  # the scale, in place
            state = {k: v * 2 if k == "scale" else v for k, v in quantizer.state_dict().items()}
            quantizer.load_state_dict(state)
        changed = quantizer(weight)
    assert quantizer.codes_of(weight) is not kept
    reference = fake_quantize(
        weight.detach(), quantizer.scale, quantizer.zero_point, quantizer.scheme
    )
    assert torch.equal(changed, reference)


def test_a_gradient_still_reaches_the_weight_through_the_fake_quantization():
    weight = nn.Parameter(torch.randn(8, 32))
    quantizer = WeightQuantizer(wb.Scheme(8, True, True, 0))
    quantizer.freeze(weight)
    quantizer(weight).sum().backward()  # grad enabled: the STE path, not the kept codes
    assert weight.grad is not None and bool((weight.grad != 0).any())


class _CountingMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc2(torch.relu(self.fc1(x)))


def test_weight_only_calibration_runs_one_batch_and_static_runs_all():
    torch.manual_seed(0)
    batches = [torch.randn(4, 16) for _ in range(5)]
    for preset, expected in (("int4-weight-g32", 1), ("int8", 5)):
        model = _CountingMLP().eval()
        reference = user_model_copy(model, "test")
        _, prepared, _ = prepare_model(reference, batches[0], wb.QuantConfig.preset(preset))
        prepared.calls = 0
        reached = calibrate(prepared, batches, progress=False)
        assert prepared.calls == expected
        assert reached == {"fc1", "fc2"}


def _conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)
    )


@pytest.mark.parametrize(
    "config",
    [
        wb.QuantConfig.preset("int8", equalize=True, bias_correction=True),
        wb.QuantConfig.preset("int8", smoothquant=0.5),
    ],
    ids=["equalize+bias_correction", "smoothquant"],
)
def test_steps_that_change_weights_leave_the_shared_user_weights_alone(config):
    torch.manual_seed(0)
    model = _conv_bn().eval() if config.smoothquant is None else _mlp_with_norm().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    if config.smoothquant is not None:
        batches = [torch.randn(2, 6, 16) for _ in range(3)]
    result = wb.ptq(model, batches, config=config, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    user = {id(p) for p in model.parameters()}
    own = [p for p in result.model.parameters() if id(p) not in user]
    assert own  # the changed tensors are the copy's own


def _mlp_with_norm() -> nn.Module:
    return nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))


def _tiny_llama(layers: int = 2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


def _tokens(count: int, length: int = 8, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 128, (1, length), generator=generator),
            "attention_mask": torch.ones(1, length, dtype=torch.long),
        }
        for _ in range(count)
    ]


@pytest.fixture
def large_paths(monkeypatch):
    """Every model counts as large: external data, the report's sample, the block walk."""
    monkeypatch.setattr(external_data, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(ptq_workflow, "REPORT_SAMPLE_MODEL_BYTES", 0)
    monkeypatch.setattr(blocks, "BLOCK_WALK_MODEL_BYTES", 0)


def test_external_data_export_runs_as_the_single_file_and_the_simulation(tmp_path, monkeypatch):
    model = _tiny_llama()
    batches = _tokens(2)
    result = wb.ptq(model, batches, config="int4-weight-g32", progress=False)
    single = result.export_onnx(tmp_path / "single.onnx", batches[0], check_fusion=False)
    monkeypatch.setattr(external_data, "EXTERNAL_DATA_BYTES", 0)
    path = result.export_onnx(
        tmp_path / "big.onnx", batches[0], fp32_path=tmp_path / "fp32.onnx", check_fusion=False
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "big.onnx",
        "big.onnx.data",
        "fp32.onnx",
        "fp32.onnx.data",
        "single.onnx",
    ]
    graph = onnx.load(str(path), load_external_data=False).graph
    external = [i for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    names = {i.name for i in external}
    assert "lm_head.weight_quantized" in names
    assert any(name.endswith("embed_tokens.weight") for name in names)
    assert not graph.input[2:]  # the parameters became initializers
    batch = batches[1]
    ours = run_session(make_session(path), batch)[0]
    np.testing.assert_array_equal(ours, run_session(make_session(single), batch)[0])
    with torch.no_grad():
        fp32 = model(**batch).logits.numpy()
    np.testing.assert_allclose(
        run_session(make_session(tmp_path / "fp32.onnx"), batch)[0], fp32, rtol=1e-4, atol=1e-4
    )
    fusion = result.fusion(path, warn=False)
    assert bool(fusion.table["fused"].all()) and len(fusion.table) == 15
    parity = result.parity(path, batches, per_layer=True)
    assert parity.table["cosine"].min() > 0.999
    bench = wb.benchmark(tmp_path / "fp32.onnx", path, batch, runs=2, warmup=1)
    size = bench.table.set_index("model").loc["int8", "file_bytes"]
    assert size == path.stat().st_size + (tmp_path / "big.onnx.data").stat().st_size


def test_a_failed_external_data_write_leaves_no_file(tmp_path, monkeypatch):
    model = _tiny_llama(1)
    batches = _tokens(1)
    result = wb.ptq(model, batches, config="int4-weight-g32", progress=False)
    monkeypatch.setattr(external_data, "EXTERNAL_DATA_BYTES", 0)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(external_data.ExternalDataWriter, "initializer", fail)
    with pytest.raises(ExportError, match="free space"):
        result.export_onnx(tmp_path / "m.onnx", batches[0], check_fusion=False)
    assert list(tmp_path.iterdir()) == []


def test_a_graph_too_large_for_one_file_is_an_export_error_naming_external_data(
    tmp_path, monkeypatch
):
    model = nn.Sequential(nn.Linear(16, 8))
    result = wb.ptq(model, [torch.randn(4, 16)], progress=False)

    def too_large(*args, **kwargs):
        raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")

    monkeypatch.setattr(onnx, "save", too_large)
    with pytest.raises(ExportError, match="external_data=True"):
        result.export_onnx(tmp_path / "m.onnx", torch.randn(1, 16), check_fusion=False)
    assert list(tmp_path.iterdir()) == []


def test_block_walk_gptq_gives_the_codes_of_whole_model_passes(monkeypatch):
    model = _tiny_llama()
    batches = _tokens(2)
    config = wb.QuantConfig.preset("int4-weight-g32", weight_method="gptq")
    whole = wb.ptq(model, batches, config=config, progress=False)
    monkeypatch.setattr(blocks, "BLOCK_WALK_MODEL_BYTES", 0)
    walked = blocks.first_block_inputs(whole.model, batches)
    assert walked is not None and len(walked[0]) == 2
    by_block = wb.ptq(model, batches, config=config, progress=False)
    for (name, a), (_, b) in zip(
        iter_quantized_layers(whole.model), iter_quantized_layers(by_block.model), strict=True
    ):
        assert torch.equal(a.weight_quantizer.codes, b.weight_quantizer.codes), name


def test_the_lm_head_takes_its_inputs_from_the_walk_without_running_the_blocks_again(monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_WALK_MODEL_BYTES", 0)
    batches = _tokens(2)
    config = wb.QuantConfig.preset("int4-weight-g32", weight_method="gptq")
    model = wb.ptq(_tiny_llama(), batches, config=config, progress=False).model
    lm_head = dict(iter_quantized_layers(model))["lm_head"]
    assert isinstance(lm_head.weight_quantizer, GPTQWeightQuantizer)  # rounded after the walk
    walked, inputs = blocks.first_block_inputs(model, batches)
    with torch.no_grad():
        for block in walked:
            outputs = [block(*call.args, **call.kwargs) for call in inputs]
            inputs = [
                call.with_hidden(blocks.hidden_of(out))
                for call, out in zip(inputs, outputs, strict=True)
            ]
        expected = [model(**batch).logits for batch in batches]
    attention_calls = []
    handles = [
        block.self_attn.register_forward_pre_hook(lambda *args: attention_calls.append(1))
        for block in walked
    ]
    with blocks.blocks_replayed(walked, outputs) as choose, torch.no_grad():
        for index in (1, 0):
            choose(index)
            torch.testing.assert_close(model(**batches[index]).logits, expected[index])
    for handle in handles:
        handle.remove()
    assert attention_calls == []  # the blocks returned the walk's output without running
    assert all("forward" not in vars(block) for block in walked)  # and are themselves again


def test_a_model_that_is_no_chain_of_blocks_is_not_walked(monkeypatch):
    class Scaled(nn.Module):  # scales the hidden state between its blocks
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                x = 2 * block(x)
            return x

    monkeypatch.setattr(blocks, "BLOCK_WALK_MODEL_BYTES", 0)
    result = wb.ptq(Scaled(), [torch.randn(4, 8)], config="int4-weight", progress=False)
    assert blocks.block_list(result.model) is not None
    assert blocks.first_block_inputs(result.model, [torch.randn(4, 8)]) is None


def test_large_model_report_measures_a_sample_and_states_time_and_memory(large_paths):
    model = _tiny_llama(1)
    batches = _tokens(3)
    result = wb.ptq(model, batches, config="int4-weight-g32", progress=False)
    summary = result.report.summary
    assert summary["layer_errors_batches"] == 1
    assert "first 1 of 3 batches" in summary["layer_errors_sample"]
    assert set(summary["stage_seconds"]) >= {"prepare", "calibration", "report"}
    assert summary["peak_rss_bytes"] > 0
    assert "per-layer errors measured on the first 1 of 3" in result.report.summary_text()
    layers = result.report.layers
    assert layers.loc[layers["status"] == "quantized", "output_sqnr_db"].notna().all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_kept_4bit_codes_are_matmulnbits_bytes_as_they_are(symmetric):
    from workbench.runtime.blockwise_specs import _kept_packed, pack_codes, pack_zero_points

    torch.manual_seed(0)
    scheme = wb.Scheme(4, symmetric, True, 0, group_size=32)
    model = nn.Sequential(nn.Linear(128, 48))
    config = wb.QuantConfig(weight=scheme, activation=None)
    layer = wb.ptq(model, [torch.randn(8, 128)], config=config, progress=False).model[0]
    fast = _kept_packed(layer)
    # the reference packing, from codes recomputed by the independent core formula
    quantizer = layer.weight_quantizer
    codes = wb.core.quantize_with(
        layer.layer.weight.detach(), quantizer.scale, quantizer.zero_point, scheme
    )
    unsigned = (codes + (8 if symmetric else 0)).numpy().astype(np.uint8)
    np.testing.assert_array_equal(fast["weight_quantized"], pack_codes(unsigned, 4, 32))
    np.testing.assert_array_equal(fast["weight_scale"], quantizer.scale.reshape(-1).numpy())
    if not symmetric:
        zero_points = quantizer.zero_point.numpy().astype(np.uint8)
        np.testing.assert_array_equal(fast["weight_zero_point"], pack_zero_points(zero_points, 4))


def test_layers_reading_one_input_take_it_in_one_pass(monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_WALK_MODEL_BYTES", 0)
    model = _tiny_llama()
    batches = _tokens(1)
    result = wb.ptq(model, batches, config="int4-weight-g32", progress=False)
    walked, inputs = blocks.first_block_inputs(result.model, batches)
    groups = blocks.sibling_groups(walked[1], inputs[0])
    short = [[name.rsplit(".", 1)[-1] for name in group] for group in groups]
    assert short == [
        ["q_proj", "k_proj", "v_proj"],
        ["o_proj"],
        ["gate_proj", "up_proj"],
        ["down_proj"],
    ]


def test_layers_reading_one_input_share_one_hessian_factored_once(monkeypatch):
    """q / k / v and gate / up read one tensor: one factorization each per block (the codes
    equal separate factorizations': test_block_walk_gptq_gives_the_codes_of_whole_model_passes)."""
    monkeypatch.setattr(blocks, "BLOCK_WALK_MODEL_BYTES", 0)
    factored: list[int] = []
    original = gptq_module.factor_hessian

    def counting(hessian, act_order=False):
        factored.append(hessian.shape[0])
        return original(hessian, act_order)

    monkeypatch.setattr(gptq_module, "factor_hessian", counting)
    config = wb.QuantConfig.preset("int4-weight-g32", weight_method="gptq")
    result = wb.ptq(_tiny_llama(layers=2), _tokens(2), config=config, progress=False)
    rounded = [layer for _, layer in iter_quantized_layers(result.model)]
    assert all(isinstance(layer.weight_quantizer, GPTQWeightQuantizer) for layer in rounded)
    # per block: q/k/v, o, gate/up (64 inputs each) and down (96); then the LM head
    assert factored == [64, 64, 64, 96] * 2 + [64]


def test_gptq_layers_compute_from_their_codes_a_block_of_rows_at_a_time(monkeypatch):
    """A large GPTQ Linear (an LM head) never dequantizes its whole weight in a forward pass,
    and gives what the whole dequantized weight gives."""
    config = wb.QuantConfig.preset("int4-weight-g32", weight_method="gptq")
    result = wb.ptq(_tiny_llama(), _tokens(2), config=config, progress=False)
    head = dict(iter_quantized_layers(result.model))["lm_head"]
    assert isinstance(head.weight_quantizer, GPTQWeightQuantizer)
    x = torch.randn(1, 5, 64)
    whole = F.linear(x, head.weight_quantizer.dequantized)
    monkeypatch.setattr(gptq_layers, "BLOCKED_LINEAR_ELEMENTS", 1024)  # 128 x 64: blocked
    monkeypatch.setattr(modules_module, "BLOCKED_LINEAR_ELEMENTS", 1024)  # 16 rows a block

    def whole_weight(self):
        raise AssertionError("the whole weight was dequantized")

    monkeypatch.setattr(GPTQWeightQuantizer, "dequantized", property(whole_weight))
    with torch.no_grad():
        torch.testing.assert_close(head(x), whole, rtol=1e-5, atol=1e-6)


def test_shape_inference_without_the_large_parameters_writes_the_same_graph(tmp_path, monkeypatch):
    from workbench.runtime import torchscript_trace

    model = _tiny_llama(1)
    batches = _tokens(2)
    result = wb.ptq(model, batches, config="int4-weight-g32", progress=False)
    monkeypatch.setattr(external_data, "EXTERNAL_DATA_BYTES", 0)
    infer = torch._C._jit_pass_onnx_graph_shape_type_inference
    graphs, outputs = [], []
    for limit, name in ((1 << 62, "all"), (0, "none")):  # every parameter's values / none
        monkeypatch.setattr(torchscript_trace, "SHAPE_INFERENCE_PARAMETER_ELEMENTS", limit)
        path = result.export_onnx(tmp_path / f"{name}.onnx", batches[0], check_fusion=False)
        assert torch._C._jit_pass_onnx_graph_shape_type_inference is infer  # put back
        graph = onnx.load(str(path), load_external_data=False).graph
        graphs.append(
            (
                [(n.op_type, list(n.input), list(n.output)) for n in graph.node],
                sorted(str(v.type) for v in [*graph.value_info, *graph.output]),
            )
        )
        outputs.append(run_session(make_session(path), batches[1])[0])
    assert graphs[0] == graphs[1]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_a_large_model_probes_on_its_first_tokens_with_the_same_result(monkeypatch):
    model = _tiny_llama()
    batches = _tokens(2, length=4 * PROBE_TOKENS)
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


def test_large_model_report_measures_the_first_tokens_as_an_independent_measure(large_paths):
    model = _tiny_llama(1)
    batches = _tokens(2, length=2 * ptq_workflow.REPORT_SAMPLE_TOKENS)
    result = wb.ptq(model, batches, config="int4-weight-g32", progress=False)
    summary = result.report.summary
    tokens = ptq_workflow.REPORT_SAMPLE_TOKENS
    assert f"first 1 of 2 batches (their first {tokens} tokens)" in summary["layer_errors_sample"]
    sample = {key: value[:, :tokens] for key, value in batches[0].items()}
    with torch.no_grad():
        reference = model(**sample).logits.double()
        quantized = result.model(**sample).logits.double()
    noise = float(((reference - quantized) ** 2).sum())
    sqnr_db = 10 * np.log10(float((reference**2).sum()) / noise)
    assert summary["model_output_sqnr_db"] == pytest.approx(sqnr_db, abs=1e-6)


def test_large_models_show_a_bar_per_block_and_per_layer_written(large_paths, tmp_path, capsys):
    model = _tiny_llama(2)
    batches = _tokens(2)
    result = wb.ptq(model, batches, config="int4-weight-g32", progress=True)
    result.export_onnx(tmp_path / "big.onnx", batches[0], check_fusion=False)
    bars = capsys.readouterr().err.replace("\r", "\n")
    quantized = sum(result.report.layers["status"] == "quantized")  # each written once
    for desc, steps in (
        ("calibrating (blocks)", 2),
        ("report (blocks)", 4),
        ("export (layers)", quantized),
    ):
        assert f"{desc}: 100%" in bars and f" {steps}/{steps} [" in bars, (desc, bars)
    wb.ptq(model, batches, config="int4-weight-g32", progress=False)
    assert capsys.readouterr().err == ""
