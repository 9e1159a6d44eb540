"""The Export & Benchmark tab's generation benchmark, shown for decoder LMs that ONNX Runtime
GenAI's builder takes (LLaMA, Mistral, Qwen2): a button that builds the folders (ours and the
builder's FP32 and RTN int4 builds; the builder runs once per folder, so it is never
automatic) and the table of prefill ms, decode tokens/s and file size with the CPU line."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from workbench.errors import ConfigError, ExportError
from workbench.notebook import actions
from workbench.notebook.display import status_html, table_html, text_html

HEADERS = {
    "model": "Folder",
    "prefill_ms_p50": "Prefill p50 (ms)",
    "decode_tokens_per_s": "Decode (tokens/s)",
    "file_mb": "File (MB)",
    "decode_vs_first": "Decode vs first",
}


def is_genai_decoder(model: Any) -> bool:
    """Whether ONNX Runtime GenAI's builder takes the model's family."""
    from workbench.runtime.genai_export import check_genai_family

    try:
        check_genai_family(model)
    except ExportError:
        return False
    return True


class GenerationSection:
    """The section's widgets and its button's action; hidden until a run of a supported
    decoder."""

    def __init__(self, panel: Any) -> None:
        self.panel = panel
        self.button = widgets.Button(
            description="Generation benchmark",
            icon="clock",
            tooltip="build ONNX Runtime GenAI folders (ours, the builder's FP32 and RTN int4) "
            "and time prefill and decode",
        )
        self.status = widgets.HTML()
        self.html = widgets.HTML()
        self.box = widgets.VBox([self.button, self.status, self.html])
        self.box.layout.display = "none"
        self.button.on_click(self._on_click)
        self.benchmark = None

    @classmethod
    def attach(cls, panel: Any) -> GenerationSection:
        """Add the section to the panel's Export & Benchmark tab."""
        section = cls(panel)
        page = panel.export.page
        page.children = (*page.children, section.box)
        return section

    def show_for(self, result: Any) -> None:
        """Shown (and reset) when ``result``'s model is a decoder the builder takes."""
        self.benchmark = None
        self.status.value = self.html.value = ""
        shown = result is not None and is_genai_decoder(result.model)
        self.box.layout.display = None if shown else "none"

    def _on_click(self, _button=None) -> None:
        panel = self.panel
        if panel._busy or panel.result is None:
            return
        panel._set_busy(True, "Building ONNX Runtime GenAI folders and timing them...", self.status)
        try:
            if panel.tokenizer is None:
                raise ConfigError(
                    "the generation benchmark needs the model's tokenizer: "
                    "wb.panel(model, calib_data, tokenizer=tokenizer)"
                )
            data = panel.calib_data if panel.calib_data is not None else panel.train_data
            self.benchmark = actions.generation_benchmark(panel.result, panel.tokenizer, data)
            self.html.value = text_html(self.benchmark.cpu) + table_html(
                self.benchmark.table, HEADERS
            )
            self.status.value = status_html("Timed on ONNX Runtime GenAI", "ok")
            panel.error, panel.last_exception = "", None
        except Exception as exc:  # the panel stays usable; the error is shown in one line
            panel._fail(exc, self.status)
        finally:
            panel._set_busy(False)
