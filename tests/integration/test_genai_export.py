"""``export_genai``: onnxruntime-genai's own builder makes the folder from our GPTQ checkpoint;
its logits and greedy tokens are checked against the simulated model, and the panel's
generation benchmark times it beside the builder's FP32 and RTN int4 builds of the weights.
Each builder run takes ~20 s (mostly its imports), hence slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime_genai")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from decoder_lm_models import small_tokenizer, tiny_llama, token_batches

import workbench as wb

pytestmark = pytest.mark.slow
PROMPTS = ["def add(x, y):", "the quick brown", "import os", "for item in"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("genai")
    tokenizer = small_tokenizer()
    config = wb.QuantConfig.preset(
        "int4-weight-g32", weight_method="gptq", gptq_act_order=True, quantize_embeddings=False
    )
    res = wb.ptq(tiny_llama(hidden=128), token_batches(), config=config, progress=False)
    folder = res.export_genai(work / "gptq_int4", tokenizer)
    return res, folder, tokenizer, work


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_prefill_matches_simulation(folder, res, tokenizer, prompts) -> None:
    """Each prompt's logits at every position, from the folder's ``og.Generator`` prefill,
    against the simulated model's: MatMulNBits at accuracy_level 4 rounds each input block
    to int8, so close, not equal."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray([ids], np.int32))
        logits = np.asarray(generator.get_output("logits"))[0]
        with torch.no_grad():
            expected = res.model(input_ids=torch.tensor([ids])).logits[0].numpy()
        for position in range(len(ids)):
            assert _cosine(logits[position], expected[position]) >= 0.999


def test_folder_is_the_builders_graph_with_a_kv_cache(built):
    res, folder, _, _ = built
    names = {p.name for p in folder.iterdir()}
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= names
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    assert genai["eos_token_id"] < genai["vocab_size"] == res.model.config.vocab_size
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "GroupQueryAttention" in ops and "MatMul" not in ops  # every projection packed
    assert ops.count("MatMulNBits") >= 2 * 3 + 1  # fused qkv, o, mlp per layer; LM head
    assert any(i.name.startswith("past_key_values") for i in graph.input)


def test_prefill_logits_match_the_simulation(built):
    res, folder, tokenizer, _ = built
    assert_prefill_matches_simulation(folder, res, tokenizer, PROMPTS)


def test_greedy_tokens_agree_or_differ_only_at_near_ties(built):
    res, folder, _, _ = built
    parity = res.generation_parity(folder, PROMPTS, new_tokens=32)
    table = parity.table
    assert len(table) == len(PROMPTS) and (table["positions"] == 32).all()
    differ = table["first_difference"].notna()
    assert (table.loc[~differ, "agreeing_positions"] == 32).all()
    assert (table.loc[differ, "cosine_there"] >= 0.999).all()
    assert (table["min_cosine_before"].dropna() >= 0.999).all()
    assert parity.REPORT_TITLE in res.report.extra_tables


def test_panel_times_our_folder_beside_the_builders_fp32_and_rtn_builds(tmp_path, monkeypatch):
    """The panel's generation benchmark (``QuantResult.generation_benchmark``): three folders
    made by the builder from one model, timed in one run; no folder left behind."""
    monkeypatch.chdir(tmp_path)
    app = wb.panel(tiny_llama(hidden=128), token_batches(), tokenizer=small_tokenizer())
    app.set_controls(preset="int4-weight-g32", weight_method="gptq")
    app.run_button.click()
    app.generation.button.click()
    assert app.error == "", app.error
    bench = app.generation.benchmark
    table = bench.table.set_index("model")
    assert list(table.index) == ["builder fp32", "builder rtn int4", "ours gptq int4"]
    assert (table["decode_tokens_per_s"] > 0).all() and (table["prefill_ms_p50"] > 0).all()
    # 4-bit codes + a float scale (and ours a 4-bit zero point) per 32 inputs vs float32
    # weights, embeddings FP32 in all three
    fp32_mb = table.loc["builder fp32", "file_mb"]
    assert table.loc["ours gptq int4", "file_mb"] < 0.6 * fp32_mb
    assert table.loc["builder rtn int4", "file_mb"] < 0.6 * fp32_mb
    assert bench.cpu.startswith("CPU: ") and bench.cpu in app.generation.html.value
    assert app.result.report.extra_tables["Generation on ONNX Runtime GenAI"] is bench.table
    assert list(tmp_path.iterdir()) == []


def test_save_pretrained_loads_in_the_builder_unedited(built, tmp_path):
    """The act-order checkpoint as save_pretrained writes it (``desc_act: true``, its g_idx
    used by the builder) through the builder's CLI: logits of the simulation."""
    res, _, tokenizer, _ = built
    checkpoint = res.save_pretrained(tmp_path / "checkpoint", tokenizer)
    assert json.loads((checkpoint / "config.json").read_text())["quantization_config"]["desc_act"]
    out = tmp_path / "genai"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint)]
    command += ["-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")]
    subprocess.run(command, check=True, capture_output=True)
    assert_prefill_matches_simulation(out, res, tokenizer, PROMPTS[:1])
