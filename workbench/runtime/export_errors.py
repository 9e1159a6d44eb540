"""The error of an export that failed: the op ONNX has no equivalent for, and the module of the
model that calls it."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from workbench.errors import ExportError, first_line
from workbench.runtime.export_inputs import Positional


class _OpFinder(TorchFunctionMode):
    """Finds the innermost module that calls an op, by running the model once."""

    def __init__(self, op_names: set[str], stack: list[str]) -> None:
        super().__init__()
        self.op_names = op_names
        self.stack = stack
        self.found: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "").strip("_")
        if self.found is None and name in self.op_names and self.stack:
            self.found = self.stack[-1]
        return func(*args, **(kwargs or {}))


def _module_calling(model: nn.Module, values: tuple, arg_count: int, kwarg_names, op: str):
    short = op.split("::")[-1].strip("_")
    candidates = {short, short.split("_", 1)[-1]}
    stack: list[str] = []
    handles = []

    def enter(name: str):
        def hook(module, args) -> None:
            stack.append(name)

        return hook

    def leave(module, args, output) -> None:
        stack.pop()

    for name, module in model.named_modules():
        label = name or f"{type(model).__name__} (the model's own forward)"
        handles.append(module.register_forward_pre_hook(enter(label)))
        handles.append(module.register_forward_hook(leave))
    finder = _OpFinder(candidates, stack)
    try:
        with torch.no_grad(), finder:
            Positional(model, arg_count, kwarg_names)(*values)
    except Exception:
        return None
    finally:
        for handle in handles:
            handle.remove()
    return finder.found or None


def unsupported_op(wrapper: nn.Module, values: tuple, opset: int) -> str | None:
    """The first op (``aten::histc``) the TorchScript exporter cannot convert at ``opset``,
    as ``torch.onnx.utils.unconvertible_ops`` lists them (its UnsupportedOperatorError keeps
    the name only in its message); None when it lists none or cannot trace the model."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            _, ops = torch.onnx.utils.unconvertible_ops(wrapper, values, opset_version=opset)
    except Exception:
        return None
    return ops[0] if ops else None


def export_error(
    exc: Exception, what: str, model: nn.Module, values, arg_count, kwarg_names, opset: int
):
    first = first_line(exc)
    op = unsupported_op(Positional(model, arg_count, kwarg_names).eval(), values, opset)
    if op is None:
        return ExportError(
            f"could not export {what} to ONNX ({first}); make the model traceable with "
            "torch.jit.trace or exclude the module that fails"
        )
    module = _module_calling(model, values, arg_count, kwarg_names, op)
    where = f" used in module {module!r}" if module else ""
    return ExportError(
        f"could not export {what} to ONNX: op {op}{where} has no ONNX equivalent "
        f"({first}); rewrite that module with supported ops or leave it out of the export"
    )
