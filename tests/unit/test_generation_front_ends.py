"""The generation benchmark in the front ends, fast parts: the panel shows it only for the
decoders ONNX Runtime GenAI's builder takes, and ``%quantize --genai-bench`` on another model
is one UsageError naming those families, raised before any folder is built. The end-to-end
run (the builder, ~20 s a folder) is in tests/integration/test_genai_export.py."""

from __future__ import annotations

import pytest
from decoder_lm_models import tiny_llama, token_batches
from digits_models import tiny_mlp
from IPython.core.error import UsageError

import workbench as wb
from workbench.runtime.genai_export import GENAI_FAMILIES


@pytest.fixture(scope="module")
def model():
    return tiny_mlp()


def test_panel_shows_the_generation_benchmark_only_for_a_supported_decoder(digits):
    mlp = wb.panel(tiny_mlp(), digits.calib_batches(2, 32))
    mlp.run_button.click()
    assert mlp.result is not None and mlp.generation.box.layout.display == "none"

    llama = wb.panel(tiny_llama(), token_batches())
    assert llama.generation.box.layout.display == "none"  # nothing to time before a run
    llama.set_controls(preset="int4-weight-g32")
    llama.run_button.click()
    assert llama.result is not None, llama.error
    assert llama.generation.box.layout.display is None
    assert llama.generation.box in llama.export.page.children


def test_panel_generation_benchmark_without_a_tokenizer_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = wb.panel(tiny_llama(), token_batches())
    app.set_controls(preset="int4-weight-g32")
    app.run_button.click()
    app.generation.button.click()
    assert "tokenizer=" in app.error and "tokenizer" in app.generation.status.value
    assert app.generation.benchmark is None and list(tmp_path.iterdir()) == []
    assert not app.run_button.disabled  # the panel stays usable


def test_magic_genai_bench_on_another_model_names_the_supported_families(shell):
    shell.user_ns["tokenizer"] = object()
    with pytest.raises(UsageError) as error:
        shell.run_line_magic("quantize", "model --calib calib --genai-bench tokenizer")
    message = str(error.value)
    assert message.count("\n") == 0
    assert all(family in message for family in GENAI_FAMILIES)
    assert "TinyMLP" in message or type(shell.user_ns["model"]).__name__ in message


def test_magic_genai_bench_names_a_missing_tokenizer_variable(shell):
    with pytest.raises(UsageError, match="no_such_tokenizer"):
        shell.run_line_magic("quantize", "model --calib calib --genai-bench no_such_tokenizer")
