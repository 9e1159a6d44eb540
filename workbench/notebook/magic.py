"""The ``%quantize`` / ``%%quantize`` magics and the ``%load_ext workbench`` hook.

Thin: parse the line (and the YAML cell), look the names up in the notebook, call the public
functions through ``actions.py``. The workbench's own errors become one-line UsageErrors.
Importing this module imports neither onnxruntime nor matplotlib.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand

from workbench.errors import WorkbenchError
from workbench.notebook import actions
from workbench.notebook.display import error_line
from workbench.notebook.magic_args import HELP, parse_line
from workbench.notebook.names import lookup, lookup_callable, lookup_module
from workbench.notebook.recipe import Recipe, make_recipe, merge_options, recipe_from_yaml
from workbench.workflows.autotune_result import AutotuneResult


@contextmanager
def usage_errors() -> Iterator[None]:
    """Turn the workbench's errors (bad data, bad config, ...) into one-line UsageErrors."""
    try:
        yield
    except WorkbenchError as exc:
        raise UsageError(f"%quantize: {error_line(exc)}") from None


def run_recipe(recipe: Recipe, namespace: Mapping[str, Any]) -> Any:
    """Look the recipe's names up in ``namespace`` and run it: the QuantResult (exported and
    benchmarked when asked; a mixed-precision search with ``max_drop`` or
    ``keep_most_sensitive``, before QAT too), or the panel with
    ``panel=True``."""
    model = lookup_module(namespace, recipe.model)
    calib = lookup(namespace, recipe.calib, "--calib") if recipe.calib else None
    report_data = None
    if recipe.report_data:
        report_data = lookup(namespace, recipe.report_data, "--report-data")
    train = lookup(namespace, recipe.train, "--train") if recipe.train else None
    loss_fn = lookup_callable(namespace, recipe.loss, "--loss") if recipe.loss else None
    eval_fn = lookup_callable(namespace, recipe.eval, "--eval") if recipe.eval else None
    example = lookup(namespace, recipe.example, "--example") if recipe.example else None
    tokenizer = None
    if recipe.genai_bench:
        tokenizer = lookup(namespace, recipe.genai_bench, "--genai-bench")
        actions.check_generation_model(model)  # before quantizing: names the families
    config = recipe.config()
    if recipe.panel:
        from workbench.notebook.panel import panel

        app = panel(model, calib, eval_fn, train, loss_fn, example, report_data, tokenizer)
        app.set_controls(**recipe.control_values())
        return app
    result = actions.quantize(
        model,
        config,
        method=recipe.method,
        calib_data=calib,
        train_data=train,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        report_data=report_data,
        **recipe.run_options(),
    )
    run = result.best if isinstance(result, AutotuneResult) else result  # --auto: its best
    if (recipe.export or recipe.bench) and run is not None:
        if example is None:
            example = actions.first_input(calib if calib is not None else train)
        onnx_path = actions.export(run, recipe.export, example) if recipe.export else None
        if recipe.bench:
            actions.benchmark(run, example, onnx_path)
    if tokenizer is not None and run is not None:
        actions.generation_benchmark(run, tokenizer, calib if calib is not None else train)
    return result


RESULT_TYPES = ("QuantResult", "AutotuneResult", "WorkbenchPanel")


def check_output_name(recipe: Recipe, namespace: Mapping[str, Any]) -> None:
    """``-o NAME`` never replaces the model, and replaces another variable only when it holds
    an earlier result, unless ``--force``."""
    name = recipe.output
    if name == recipe.model:
        raise UsageError(
            f"%quantize: -o {name} would replace the model with the result; choose another "
            "name (e.g. -o result)"
        )
    if name in namespace and not recipe.force:
        held = type(namespace[name]).__name__
        if held not in RESULT_TYPES:
            raise UsageError(
                f"%quantize: -o {name} would replace the variable {name!r} (it holds a {held} "
                "object); choose another name, or add --force to replace it"
            )


@magics_class
class QuantizeMagics(Magics):
    """``%quantize`` (line) and ``%%quantize`` (cell with a YAML recipe)."""

    @no_var_expand  # names are looked up, never evaluated: no {expr} / $name expansion
    @line_cell_magic
    def quantize(self, line: str, cell: str | None = None) -> Any:
        options = parse_line(line)
        if cell is not None:
            options = merge_options(options, recipe_from_yaml(cell))
        recipe = make_recipe(options)
        if recipe.output:
            check_output_name(recipe, self.shell.user_ns)
        with usage_errors():
            value = run_recipe(recipe, self.shell.user_ns)
        if recipe.output:
            self.shell.user_ns[recipe.output] = value
        return value


QuantizeMagics.quantize.__doc__ = HELP


def load_ipython_extension(ipython) -> None:
    """``%load_ext workbench``: register ``%quantize`` and ``%%quantize``."""
    ipython.register_magics(QuantizeMagics)
