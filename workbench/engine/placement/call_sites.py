"""Call sites: one name per module call and per tensor op of a forward pass, the same every time
the forward runs, and quantizers attached to them.

A module called at several places (ResNet's one ``self.relu`` used twice per block) and a tensor
op outside any module (``out += identity``, ``torch.cat``, ``F.relu``) have no module of their
own to hold an output quantizer. So:

* a parameter-free module called at several sites is replaced, in the prepared copy, by
  :class:`PerCallSite`: one clone per call, called in turn (the n-th call of a forward runs the
  n-th clone), so each call site has its own quantizer;
* a tensor op's quantizer lives in :class:`FunctionSites`, a submodule of the model's root,
  keyed by the op's site name ``"<module running it>.<op>#<n>"`` (the n-th such op at depth 0
  of that module's forward). While the root's forward runs, a ``TorchFunctionMode`` numbers the
  ops the same way the trace did and quantizes the outputs of those that have a quantizer
  (and the inputs, keyed ``"<site>/input<i>"``, of an attention matmul);
* a layer with weights called at several sites (a shared conv) cannot be cloned (its calls
  share one weight, trained once by QAT and stored once): its output quantizers live in
  :class:`FunctionSites` too, keyed by the module's call site ``"<module>#<n>"``, and a global
  forward hook quantizes the output of the n-th call with the n-th site's quantizer.

"Depth 0" means: not inside a leaf module (a module without children, or one of the
quantization wrappers, which carry ``quantization_leaf = True``). The ops a leaf runs
internally are the leaf's own business and are not numbered.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.overrides import TorchFunctionMode

from workbench.engine.placement.layers import QuantizedLayer

SKIPPED_FUNCTIONS = {"__get__", "__set__", "__len__", "__bool__", "__index__", "__repr__"}


def is_leaf(module: nn.Module) -> bool:
    """Whether the ops inside ``module``'s forward belong to it (it is one call site)."""
    if isinstance(module, QuantizedLayer) or getattr(module, "quantization_leaf", False):
        return True
    return not any(True for _ in module.children())


def function_name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


class CallTracker:
    """Follows one forward pass: the module running each op, whether a leaf is running, and
    the running count of each (module, op) pair, which names the op's call site."""

    def __init__(self, names: dict[nn.Module, str]) -> None:
        self.names = names
        self.owners: list[str] = []
        self.leaf_depth = 0
        self.counts: Counter[tuple[str, str]] = Counter()
        self.module_calls: Counter[str] = Counter()

    def enter(self, module: nn.Module) -> str | None:
        """A module call begins; returns the module's site name when it is a leaf at depth 0."""
        name = self.names.get(module)
        if self.leaf_depth > 0 or name is None:
            self.leaf_depth += self.leaf_depth > 0
            return None
        if is_leaf(module):
            self.leaf_depth = 1
            index = self.module_calls[name]
            self.module_calls[name] += 1
            return f"{name}#{index}"
        self.owners.append(name)
        return None

    def leave(self, module: nn.Module) -> None:
        if self.leaf_depth > 0:
            self.leaf_depth -= 1
        elif self.names.get(module) is not None and self.owners:
            self.owners.pop()

    def function_site(self, op: str) -> str | None:
        """The site name of a tensor op called now (``None`` inside a leaf)."""
        if self.leaf_depth > 0 or op in SKIPPED_FUNCTIONS:
            return None
        owner = self.owners[-1] if self.owners else ""
        index = self.counts[(owner, op)]
        self.counts[(owner, op)] += 1
        return f"{owner}.{op}#{index}" if owner else f"{op}#{index}"


class tracked_calls:
    """Context manager: global module hooks feeding ``tracker`` while the forward runs."""

    def __init__(self, tracker: CallTracker, on_enter=None, on_leave=None) -> None:
        self.tracker = tracker
        self.on_enter = on_enter
        self.on_leave = on_leave
        self.handles: list = []

    def __enter__(self) -> CallTracker:
        def pre_hook(module, args):
            site = self.tracker.enter(module)
            if self.on_enter is not None:
                self.on_enter(module, site, args)

        def post_hook(module, args, output):
            replaced = None
            if self.on_leave is not None and self.tracker.leaf_depth == 1:
                replaced = self.on_leave(module, args, output)
            self.tracker.leave(module)
            return replaced  # a forward hook returning a value replaces the module's output

        self.handles = [
            torch_module.register_module_forward_pre_hook(pre_hook),
            torch_module.register_module_forward_hook(post_hook, always_call=True),
        ]
        return self.tracker

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class CountsCalls:
    """A module that does something different at each of its call sites: ``next_call()`` is the
    index of this call within the current forward of the root (:class:`FunctionSites` resets
    ``calls`` when the root's forward begins)."""

    calls: int = 0
    call_count: int = 1

    def next_call(self) -> int:
        index = self.calls % max(1, self.call_count)
        self.calls += 1
        return index


class PerCallSite(CountsCalls, nn.Module):
    """A parameter-free module called at several sites, as one clone per call: the n-th call of
    a forward runs ``sites[n]`` (counted from the root's forward, see :class:`FunctionSites`)."""

    quantization_leaf = True

    def __init__(self, module: nn.Module, count: int) -> None:
        super().__init__()
        self.sites = nn.ModuleList(_clone(module) for _ in range(count))
        self.calls = 0
        self.call_count = count

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.sites[self.next_call()](*args, **kwargs)


def _clone(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


class site_functions(TorchFunctionMode):
    """Torch function mode: every tensor op called while it is active goes to
    ``call(site, name, func, args, kwargs)``, ``site`` being the op's call site by ``tracker``
    (None inside a leaf module or for an op not tracked) and ``name`` the op's name."""

    def __init__(self, tracker: CallTracker, call: Callable[..., Any]) -> None:
        super().__init__()
        self.tracker = tracker
        self.call = call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = function_name(func)
        return self.call(self.tracker.function_site(name), name, func, args, kwargs or {})


def input_site(site: str, index: int) -> str:
    """The key of the quantizer of a tensor op's ``index``-th positional input."""
    return f"{site}/input{index}"


class FunctionSites(nn.Module):
    """Output quantizers of tensor ops, keyed by site name; applied while the root runs.

    Installed as a submodule of the root with a forward pre-hook and an (always called)
    forward hook on the root, both bound methods of this module so that a deep copy of the
    model carries them along with the copied quantizers.
    """

    quantization_leaf = True
    ATTRIBUTE = "quantization_sites"

    def __init__(self) -> None:
        super().__init__()
        self.quantizers = nn.ModuleDict()
        self.site_names: dict[str, str] = {}  # site name -> key in self.quantizers
        self._input_sites = 0  # how many keys name an op's input (input_site)
        self._active: list = []

    def add(self, site: str, quantizer: nn.Module) -> str:
        """Attach ``quantizer`` to ``site``; returns its path below the root."""
        key = f"site{len(self.quantizers)}"
        self.quantizers[key] = quantizer
        self.site_names[site] = key
        self._input_sites += "/input" in site
        return f"{self.ATTRIBUTE}.quantizers.{key}"

    def remove(self, site: str) -> None:
        key = self.site_names.pop(site)
        del self.quantizers[key]
        self._input_sites -= "/input" in site

    @property
    def has_input_quantizers(self) -> bool:
        return self._input_sites > 0

    def quantizer(self, site: str) -> nn.Module | None:
        key = self.site_names.get(site)
        return self.quantizers[key] if key is not None else None

    def site_of_path(self) -> dict[str, str]:
        """Path below the root of each quantizer -> its site name."""
        return {f"{self.ATTRIBUTE}.quantizers.{k}": s for s, k in self.site_names.items()}

    def begin(self, root: nn.Module, args: Any) -> None:
        for module in root.modules():
            if isinstance(module, CountsCalls):
                module.calls = 0
        if not self.site_names:
            self._active.append(None)
            return
        names = {module: name for name, module in root.named_modules() if name}
        tracker = CallTracker(names)
        module_sites: list[str | None] = []

        def on_enter(module: nn.Module, site: str | None, args: Any) -> None:
            if site is not None:
                module_sites.append(site)

        def on_leave(module: nn.Module, args: Any, output: Any) -> Any:
            site = module_sites.pop() if module_sites else None
            quantizer = self.quantizer(site) if site is not None else None
            if quantizer is not None and isinstance(output, torch.Tensor):
                return quantizer(output)
            return None

        calls = tracked_calls(tracker, on_enter, on_leave)
        calls.__enter__()
        mode = site_functions(tracker, self._quantized_call)
        mode.__enter__()
        self._active.append((calls, mode))

    def _quantized_call(self, site: str | None, name: str, func, args, kwargs) -> Any:
        """A tensor op with its site's input and output quantizers applied."""
        if site is not None and self.has_input_quantizers:
            args = tuple(
                quantizer(value) if (quantizer := self.quantizer(input_site(site, i))) else value
                for i, value in enumerate(args)
            )
        out = func(*args, **kwargs)
        quantizer = self.quantizer(site) if site is not None else None
        if quantizer is not None and isinstance(out, torch.Tensor):
            out = quantizer(out)
        return out

    def end(self, root: nn.Module, args: Any, output: Any) -> None:
        active = self._active.pop() if self._active else None
        if active is not None:
            calls, mode = active
            mode.__exit__(None, None, None)
            calls.__exit__(None, None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not called
        return x

    def extra_repr(self) -> str:
        return f"{len(self.site_names)} tensor-op sites"


def install_function_sites(root: nn.Module) -> FunctionSites:
    """The root's :class:`FunctionSites` (created and hooked on first use)."""
    sites = getattr(root, FunctionSites.ATTRIBUTE, None)
    if isinstance(sites, FunctionSites):
        return sites
    sites = FunctionSites()
    setattr(root, FunctionSites.ATTRIBUTE, sites)
    root.register_forward_pre_hook(sites.begin)
    root.register_forward_hook(sites.end, always_call=True)
    return sites
