"""A quantization recipe: the options of one ``%quantize`` run, from a line or a YAML cell.

A recipe holds names of notebook variables, not the objects; ``names.py`` looks them up.
``build_config`` turns the scheme options into the QuantConfig that the panel uses too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from IPython.core.error import UsageError

from workbench.core.observers import OBSERVER_NAMES
from workbench.core.scheme import MAX_BITS, MIN_BITS
from workbench.engine.config import PRESETS, WEIGHT_METHODS, QuantConfig
from workbench.notebook.magic_args import BIAS_CORRECTION_METHODS, METHODS, OPTION_KEYS

DEFAULT_PRESET = "int8"
QAT_ONLY_KEYS = ("train", "loss", "epochs", "lr")

_STR_KEYS = {"model", "calib", "method", "eval", "output", "preset", "observer", "weight_method"}
_STR_KEYS |= {"train", "loss", "export", "example", "report_data"}
_INT_KEYS = {"num_batches", "bits", "epochs", "adaround_iterations", "keep_most_sensitive"}
_BOOL_KEYS = {"panel", "bench", "per_channel", "symmetric", "force", "equalize"}
_BOOL_KEYS |= {"gptq_act_order", "quantize_lm_head"}
_FLOAT_KEYS = {"lr", "max_drop"}
# recipe-only spellings: the negative flags and the short output flag
_NEGATED_KEYS = {"per_tensor": "per_channel", "asymmetric": "symmetric"}
_ALIASES = {"o": "output"}


@dataclass(frozen=True)
class Recipe:
    """What one ``%quantize`` run asks for. Strings are names of notebook variables."""

    model: str
    method: str = "ptq"
    calib: str | None = None
    report_data: str | None = None
    eval: str | None = None
    num_batches: int | None = None
    max_drop: float | None = None
    keep_most_sensitive: int | None = None
    output: str | None = None
    force: bool = False
    panel: bool = False
    preset: str = DEFAULT_PRESET
    bits: int | None = None
    per_channel: bool | None = None
    symmetric: bool | None = None
    observer: str | None = None
    exclude: tuple[str, ...] = ()
    override: tuple[tuple[str, str], ...] = ()  # (layer pattern, preset name)
    train: str | None = None
    loss: str | None = None
    epochs: int | None = None
    lr: float | None = None
    export: str | None = None
    example: str | None = None
    bench: bool = False
    equalize: bool | None = None
    bias_correction: bool | str | None = None  # True / "empirical" / "analytic"
    weight_method: str | None = None
    adaround_iterations: int | None = None
    gptq_act_order: bool | None = None
    smoothquant: float | str | None = None
    quantize_lm_head: bool | None = None

    def config(self) -> QuantConfig:
        """The QuantConfig these options describe."""
        return build_config(
            self.preset,
            self.bits,
            self.symmetric,
            self.per_channel,
            self.observer,
            self.exclude,
            override=dict(self.override),
            **self.ptq_options(),
        )

    def ptq_options(self) -> dict[str, Any]:
        """The PTQ refinement options given (``QuantConfig`` field names)."""
        names = (
            "equalize",
            "smoothquant",
            "bias_correction",
            "weight_method",
            "adaround_iterations",
            "gptq_act_order",
            "quantize_lm_head",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def build_config(
    preset: str = DEFAULT_PRESET,
    bits: int | None = None,
    symmetric: bool | None = None,
    per_channel: bool | None = None,
    observer: str | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    override: Mapping[str, str] | None = None,
    **ptq_options: Any,
) -> QuantConfig:
    """The preset with its weight scheme changed by the options that are not None;
    ``ptq_options`` (``equalize``, ``bias_correction``, ``weight_method``,
    ``adaround_iterations``) pass through to the QuantConfig. ``override`` maps layer
    patterns to preset names: those layers take the preset's weight and activation schemes
    (``QuantConfig.overrides``).

    Activations keep the preset's scheme (uint8 asymmetric per-tensor for ``int8``, as ONNX
    Runtime runs fastest on x86; FP32 for ``int8-weight-only``).
    """
    base = QuantConfig.preset(preset)
    changes = {"bits": bits, "symmetric": symmetric, "per_channel": per_channel}
    weight = replace(base.weight, **{k: v for k, v in changes.items() if v is not None})
    overrides: dict[str, Any] = {"weight": weight, "exclude": tuple(exclude)}
    if observer is not None:
        overrides["observer"] = observer
    overrides |= {key: value for key, value in ptq_options.items() if value is not None}
    if override:
        overrides["overrides"] = {
            pattern: {"weight": PRESETS[name].weight, "activation": PRESETS[name].activation}
            for pattern, name in override.items()
        }
    return replace(base, **overrides)


def _check_type(key: str, value: Any) -> Any:
    if key in _STR_KEYS:
        if not isinstance(value, str) or not value:
            raise UsageError(
                f"%%quantize: recipe key {key!r} must be a name or text, got {value!r}"
            )
        return value
    if key in _INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"%%quantize: recipe key {key!r} must be an integer, got {value!r}")
        return value
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise UsageError(f"%%quantize: recipe key {key!r} must be true or false, got {value!r}")
        return value
    if key in _FLOAT_KEYS:
        if not isinstance(value, bool):
            try:
                # YAML 1.1 reads 1e-4 (no dot) as a string
                return float(value)
            except (TypeError, ValueError):
                pass
        raise UsageError(f"%%quantize: recipe key {key!r} must be a number, got {value!r}")
    if key == "smoothquant":
        if value == "auto" or (
            isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
        ):
            return value
        raise UsageError(
            "%%quantize: recipe key 'smoothquant' must be an alpha in [0, 1] or auto, "
            f"got {value!r}"
        )
    if key == "bias_correction":
        if isinstance(value, bool) or value in BIAS_CORRECTION_METHODS:
            return value
        raise UsageError(
            "%%quantize: recipe key 'bias_correction' must be true, false, "
            f"{' or '.join(BIAS_CORRECTION_METHODS)}, got {value!r}"
        )
    if key == "override":
        return _override_pairs(value)
    if key == "exclude":
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise UsageError(
                f"%%quantize: recipe key 'exclude' must be a name or a list of names, got {value!r}"
            )
        return list(patterns)
    raise AssertionError(key)


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
                f"{', '.join(PRESETS)} (--exclude keeps a layer FP32)"
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
    return ", ".join("--" + key.replace("_", "-") for key in keys)


def make_recipe(options: dict[str, Any]) -> Recipe:
    """Check that the options fit together and fill in the defaults."""
    if not options.get("model"):
        raise UsageError(
            "%quantize: name the model to quantize, e.g. %quantize model --calib calib_loader"
        )
    method = options.get("method", "ptq")
    if method not in METHODS:
        raise UsageError(f"%quantize: unknown method {method!r}; choose ptq or qat")
    preset = options.get("preset", DEFAULT_PRESET)
    if preset not in PRESETS:
        raise UsageError(
            f"%quantize: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}"
        )
    observer = options.get("observer")
    if observer is not None and observer not in OBSERVER_NAMES:
        raise UsageError(
            f"%quantize: unknown observer {observer!r}; choose one of {', '.join(OBSERVER_NAMES)}"
        )
    weight_method = options.get("weight_method")
    if weight_method is not None and weight_method not in WEIGHT_METHODS:
        raise UsageError(
            f"%quantize: unknown weight method {weight_method!r}; "
            f"choose one of {', '.join(WEIGHT_METHODS)}"
        )
    if options.get("adaround_iterations") is not None and options["adaround_iterations"] < 1:
        raise UsageError(
            f"%quantize: --adaround-iterations must be >= 1, got {options['adaround_iterations']}"
        )
    bits = options.get("bits")
    if bits is not None and not MIN_BITS <= bits <= MAX_BITS:
        raise UsageError(f"%quantize: --bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    for key in ("num_batches", "epochs", "keep_most_sensitive"):
        if options.get(key) is not None and options[key] < 1:
            raise UsageError(f"%quantize: {_flags([key])} must be >= 1, got {options[key]}")
    if options.get("lr") is not None and not options["lr"] > 0:
        raise UsageError(f"%quantize: --lr must be > 0, got {options['lr']}")
    max_drop = options.get("max_drop")
    if max_drop is not None:
        if not max_drop >= 0:
            raise UsageError(f"%quantize: --max-drop must be >= 0, got {max_drop}")
        if not options.get("eval"):
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
    if method == "ptq" and not panel:
        given = [key for key in QAT_ONLY_KEYS if key in options]
        if given:
            raise UsageError(f"%quantize: {_flags(given)} apply to QAT; add --method qat")
    if method == "qat" and "num_batches" in options and not panel:
        raise UsageError(
            "%quantize: --num-batches applies to PTQ; QAT calibrates on --calib (default: "
            "the first 8 --train batches)"
        )
    if options.get("gptq_act_order") and options.get("weight_method") != "gptq" and not panel:
        raise UsageError(
            "%quantize: --gptq-act-order orders GPTQ's columns; add --weight-method gptq"
        )
    if method == "qat" and not panel:
        refine_keys = ("bias_correction", "weight_method", "gptq_act_order")
        given = [key for key in refine_keys if key in options]
        if given:
            raise UsageError(
                f"%quantize: {_flags(given)} refine PTQ; QAT trains the weights (drop them, "
                "or drop --method qat)"
            )
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
    fields = dict(options)
    fields["exclude"] = tuple(options.get("exclude", ()))
    fields["override"] = override_table(options.get("override", []))
    fields["method"], fields["preset"] = method, preset
    fields["panel"], fields["bench"] = panel, bool(options.get("bench"))
    fields["force"] = bool(options.get("force"))
    return Recipe(**fields)
