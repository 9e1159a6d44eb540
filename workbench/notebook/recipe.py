"""A quantization recipe: the options of one ``%quantize`` run, from a line or a YAML cell.

A recipe holds names of notebook variables, not the objects; ``names.py`` looks them up. Its
fields, key checks and defaults come from the option table (``options.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field, make_dataclass, replace
from typing import Any

from IPython.core.error import UsageError

from workbench.engine.config import PRESETS, QuantConfig
from workbench.notebook.magic_args import OPTION_KEYS
from workbench.notebook.option_spec import CONFIG, SCHEME
from workbench.notebook.options import (
    BY_NAME,
    DEFAULT_PRESET,
    OPTIONS,
    PANEL_OPTIONS,
    SEARCH,
    TRAINING,
    Option,
    values_for,
)

# recipe-only spellings: the negative flags and the short output flag
_NEGATED_KEYS = {
    flag.text[2:].replace("-", "_"): option.name
    for option in OPTIONS
    if len(option.flags) > 1
    for flag in option.flags
    if flag.value is False
}
_KEEP_FP32 = next(option.flag for option in OPTIONS if option.kind == "patterns")
_ALIASES = {option.short.lstrip("-"): option.name for option in OPTIONS if option.short}


def build_config(preset: str = DEFAULT_PRESET, values: Mapping[str, Any] | None = None):
    """The preset's QuantConfig with the options in ``values`` that are not None: the scheme
    options change its weight scheme, the others replace the QuantConfig fields they map to
    (``Option.field``). Layer patterns (kind ``patterns``) become a tuple; (pattern, preset)
    pairs (kind ``pairs``, a dict or pairs) give those layers the preset's weight and
    activation schemes (``QuantConfig``'s per-layer table).

    Activations keep the preset's scheme (uint8 asymmetric per-tensor for ``int8``, as ONNX
    Runtime runs fastest on x86; FP32 for ``int8-weight-only``).
    """
    base = QuantConfig.preset(preset)
    changes: dict[str, Any] = {}
    for option in OPTIONS:
        value = (values or {}).get(option.name)
        if option.target != CONFIG or value is None:
            continue
        if option.kind == "patterns":
            value = tuple(value)
        elif option.kind == "pairs":
            value = {
                pattern: {"weight": PRESETS[name].weight, "activation": PRESETS[name].activation}
                for pattern, name in dict(value).items()
            }
        changes[option.field or option.name] = value
    changes["weight"] = replace(base.weight, **values_for(SCHEME, values or {}))
    return replace(base, **changes)


def _config(self) -> QuantConfig:
    """The QuantConfig these options describe."""
    return build_config(
        self.preset, {option.name: getattr(self, option.name) for option in OPTIONS}
    )


def _run_options(self) -> dict[str, Any]:
    """The search and training options given, as ``actions.quantize`` keywords."""
    targets = (SEARCH, TRAINING)
    return {o.name: getattr(self, o.name) for o in OPTIONS if o.target in targets}


def _control_values(self) -> dict[str, Any]:
    """The values of the options the panel shows (None: its control is left as it is)."""
    return {option.name: getattr(self, option.name) for option in PANEL_OPTIONS}


Recipe = make_dataclass(
    "Recipe",
    [("model", str)]
    + [(o.name, Any, field(default=o.default)) for o in OPTIONS if o.name != "model"],
    frozen=True,
    namespace={"config": _config, "run_options": _run_options, "control_values": _control_values},
)
Recipe.__doc__ = """What one ``%quantize`` run asks for (a field per option of ``options.OPTIONS``).
Strings are names of notebook variables."""
Recipe.__module__ = __name__


def _recipe_error(key: str, what: str, value: Any) -> UsageError:
    return UsageError(f"%%quantize: recipe key {key!r} must be {what}, got {value!r}")


def _check_type(key: str, value: Any) -> Any:
    """A recipe value of the option ``key``, checked against its kind."""
    option = BY_NAME[key]
    kind = option.kind
    if kind in ("name", "text") or (kind == "choice" and option.const is None):
        if not isinstance(value, str) or not value:
            raise _recipe_error(key, "a name or text", value)
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _recipe_error(key, "an integer", value)
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _recipe_error(key, "true or false", value)
        return value
    if kind == "float":
        if not isinstance(value, bool):
            try:
                # YAML 1.1 reads 1e-4 (no dot) as a string
                return float(value)
            except (TypeError, ValueError):
                pass
        raise _recipe_error(key, "a number", value)
    if kind == "alpha":
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value == "auto" or (number and option.low <= value <= option.high):
            return value
        raise _recipe_error(key, f"an alpha in [{option.low:g}, {option.high:g}] or auto", value)
    if kind == "choice":  # with a const: true / false or one of the choices
        if isinstance(value, bool) or value in option.choices:
            return value
        raise _recipe_error(key, f"true, false, {' or '.join(option.choices)}", value)
    if kind == "pairs":
        return _override_pairs(value)
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise _recipe_error(key, "a name or a list of names", value)
    return list(patterns)


def _override_pairs(value: Any) -> list[str]:
    """A recipe's ``override`` ({pattern: preset} or a list of 'PATTERN=PRESET') as the
    line's 'PATTERN=PRESET' words."""
    if isinstance(value, dict):
        value = [f"{pattern}={preset}" for pattern, preset in value.items()]
    elif isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(
            "%%quantize: recipe key 'override' must map layer patterns to presets, "
            f"e.g. 'override: {{fc2: int8}}', got {value!r}"
        )
    return list(value)


def override_table(words: list[str]) -> tuple[tuple[str, str], ...]:
    """``--override`` words ('PATTERN=PRESET') as (pattern, preset) pairs, checked."""
    pairs = []
    for word in words:
        pattern, sep, preset = word.rpartition("=")
        if not sep or not pattern:
            raise UsageError(
                f"%quantize: --override takes PATTERN=PRESET, got {word!r}; "
                "e.g. --override fc2=int8"
            )
        if preset not in PRESETS:
            raise UsageError(
                f"%quantize: --override {word!r}: unknown preset {preset!r}; choose one of "
                f"{', '.join(PRESETS)} ({_KEEP_FP32} keeps a layer FP32)"
            )
        pairs.append((pattern, preset))
    return tuple(pairs)


def _unique_key_loader() -> type:
    """yaml's SafeLoader, except that a key written twice is an error (plain YAML keeps the
    last value silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if not isinstance(key, str | int | float | bool):
                continue
            if key in seen:
                line = key_node.start_mark.line + 1
                raise UsageError(
                    f"%%quantize: the recipe sets {key!r} twice (line {line}); keep one line "
                    "per key"
                )
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeyLoader


def recipe_from_yaml(text: str) -> dict[str, Any]:
    """The options of a ``%%quantize`` cell body (YAML), as ``{key: value}``."""
    import yaml

    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise UsageError(
            f"%%quantize: the recipe is not valid YAML ({problem}{where}); "
            "write one 'key: value' per line"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            "%%quantize: the recipe must be a mapping of 'key: value' lines "
            f"(e.g. 'calib: calib_loader'), got a {type(data).__name__}"
        )
    options: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        key = _ALIASES.get(key, key)
        negated = _NEGATED_KEYS.get(key)
        if negated is not None:
            value = not _check_type(negated, value)
            key = negated
        elif key not in OPTION_KEYS:
            valid = ", ".join(sorted(set(OPTION_KEYS) | set(_NEGATED_KEYS)))
            raise UsageError(f"%%quantize: unknown recipe key {raw_key!r}; valid keys: {valid}")
        else:
            value = _check_type(key, value)
        if key in options and options[key] != value:
            raise UsageError(f"%%quantize: the recipe sets {key!r} twice with different values")
        options[key] = value
    return options


def merge_options(line_options: dict[str, Any], recipe_options: dict[str, Any]) -> dict[str, Any]:
    """Options of a ``%%quantize`` line and of its cell; a key set in both is a mistake."""
    both = sorted(set(line_options) & set(recipe_options))
    if both:
        raise UsageError(
            f"%%quantize: {', '.join(both)} set both on the line and in the recipe; keep one"
        )
    return line_options | recipe_options


def _flags(keys) -> str:
    return ", ".join(BY_NAME[key].flag for key in keys)


def check_value(option: Option, value: Any) -> None:
    """A given value within the option's choices and bounds, else one UsageError."""
    label = option.name.replace("_", " ")
    if option.kind == "choice" and option.const is None and value not in option.choices:
        raise UsageError(
            f"%quantize: unknown {label} {value!r}; choose one of {', '.join(option.choices)}"
        )
    if option.kind not in ("int", "float"):
        return
    low, high, above = option.low, option.high, option.above
    if low is not None and high is not None and not low <= value <= high:
        raise UsageError(f"%quantize: {option.flag} must be in {low}..{high}, got {value}")
    if low is not None and not value >= low:
        raise UsageError(f"%quantize: {option.flag} must be >= {low}, got {value}")
    if above is not None and not value > above:
        raise UsageError(f"%quantize: {option.flag} must be > {above}, got {value}")


def check_methods(options: dict[str, Any], method: str) -> None:
    """The options given belong to ``method``, and what they require is given too."""
    for option in OPTIONS:
        if option.name not in options or option.requires is None:
            continue
        other, wanted = option.requires
        if options.get(option.name) and options.get(other) != wanted:
            raise UsageError(
                f"%quantize: {option.flag} {option.reason}; add {BY_NAME[other].flag} {wanted}"
            )
    misused: dict[str, list[str]] = {}
    for option in OPTIONS:
        if option.name in options and option.method not in (None, method):
            misused.setdefault(option.misuse, []).append(option.name)
    for misuse, given in misused.items():
        if method == "ptq":
            raise UsageError(f"%quantize: {_flags(given)} apply to QAT; add --method qat")
        raise UsageError(f"%quantize: {_flags(given)} {misuse}")


def _fields(options: dict[str, Any]) -> dict[str, Any]:
    """The Recipe's fields: the given options, converted by kind (defaults left out)."""
    fields = dict(options)
    for option in OPTIONS:
        if option.name not in options:
            continue
        if option.kind == "patterns":
            fields[option.name] = tuple(options[option.name])
        elif option.kind == "pairs":
            fields[option.name] = override_table(options[option.name])
        elif option.kind == "bool" and option.default is False:
            fields[option.name] = bool(options[option.name])
    return fields


def make_recipe(options: dict[str, Any]) -> Recipe:
    """Check that the options fit together and fill in the defaults."""
    if not options.get("model"):
        raise UsageError(
            "%quantize: name the model to quantize, e.g. %quantize model --calib calib_loader"
        )
    for key, value in options.items():
        if value is not None and key in BY_NAME:
            check_value(BY_NAME[key], value)
    method = options.get("method", BY_NAME["method"].default)
    preset = options.get("preset", DEFAULT_PRESET)
    if options.get("max_drop") is not None and not options.get("eval"):
        raise UsageError(
            "%quantize: --max-drop is a drop of the --eval metric; add --eval FN "
            "(eval_fn(model) -> float, higher is better)"
        )
    output = options.get("output")
    if output is not None and not output.isidentifier():
        raise UsageError(f"%quantize: -o takes a variable name, got {output!r}")
    panel = bool(options.get("panel"))
    if method == "ptq" and not options.get("calib") and not PRESETS[preset].dynamic:
        raise UsageError(
            "%quantize: PTQ needs calibration data: add --calib DATA "
            "(a DataLoader, list of batches or tensor), use --preset int8-dynamic (no data "
            "needed), or use --method qat"
        )
    wants_input = options.get("export") or options.get("bench")
    if method == "ptq" and not options.get("calib") and wants_input and not options.get("example"):
        raise UsageError(
            "%quantize: --export / --bench without --calib need an input to trace: add "
            "--example INPUT"
        )
    if not panel:
        check_methods(options, method)
    if method == "qat":
        missing = [key for key in ("train", "loss") if not options.get(key)]
        if missing:
            raise UsageError(
                f"%quantize: QAT needs training data and a loss: add {_flags(missing)} "
                "(e.g. --train train_loader --loss loss_fn)"
            )
    if panel:
        given = [key for key in ("export", "bench") if options.get(key)]
        if given:
            raise UsageError(
                f"%quantize: {_flags(given)} are buttons of the panel; drop them or drop --panel"
            )
    elif options.get("example") and not (options.get("export") or options.get("bench")):
        raise UsageError("%quantize: --example is the input of --export / --bench; add one")
    return Recipe(**_fields(options))
