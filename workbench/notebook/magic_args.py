"""The ``%quantize`` option parser and its help text, built from the option table
(``options.py``).

The options are also the keys of a ``%%quantize`` YAML recipe (``--num-batches`` is
``num_batches``), so both are parsed into the same dict of option -> value.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from IPython.core.error import UsageError

from workbench.notebook.option_spec import GROUPS, Option
from workbench.notebook.options import BY_NAME, EXAMPLES, OPTIONS

DESCRIPTION = """\
Quantize the nn.Module called MODEL in this notebook with post-training quantization (PTQ,
the default) or quantization-aware training (QAT), and return the QuantResult; it displays as
the per-layer report. MODEL, DATA, FN and INPUT are names of notebook variables (dotted
attributes such as data.calib work too). The scheme options change the preset's weight scheme;
activations follow the preset (uint8 asymmetric per-tensor for int8, FP32 for
int8-weight-only)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes become one-line UsageErrors instead of SystemExit."""

    def error(self, message: str):
        raise UsageError(f"%quantize: {message} (see %quantize? for the options)")

    def exit(self, status: int = 0, message: str | None = None):
        raise UsageError(f"%quantize: {(message or 'invalid options').strip()}")


def _number(option: Option):
    """The argparse type of a number option: a lower bound is checked here (an int or float
    within ``low``..``high`` is checked with the recipe, by ``recipe.check_bounds``)."""
    convert = int if option.kind == "int" else float
    if option.high is not None or (option.low is None and option.above is None):
        return convert

    def parse(text: str):
        value = convert(text)
        if option.low is not None and not value >= option.low:
            raise argparse.ArgumentTypeError(f"must be >= {option.low}, got {text}")
        if option.above is not None and not value > option.above:
            raise argparse.ArgumentTypeError(f"must be > {option.above}, got {text}")
        return value

    if option.kind == "int":
        parse.__name__ = "positive int" if option.low == 1 else f"int >= {option.low}"
    elif option.above == 0:
        parse.__name__ = "positive number"
    else:
        parse.__name__ = f"number >= {option.low}"
    return parse


def _alpha(option: Option):
    """The argparse type of an alpha option: a number in ``low``..``high`` or ``auto``."""

    def parse(text: str) -> float | str:
        if text == "auto":
            return text
        value = float(text)
        if not option.low <= value <= option.high:
            raise argparse.ArgumentTypeError(
                f"must be an alpha in [{option.low:g}, {option.high:g}] or auto, got {text}"
            )
        return value

    parse.__name__ = "alpha"
    return parse


def _add(group, option: Option) -> None:
    """Add ``option`` to a parser group as the table declares it."""
    if option.flags:
        target = group.add_mutually_exclusive_group() if len(option.flags) > 1 else group
        for flag in option.flags:
            target.add_argument(
                flag.text, dest=option.name, action="store_const", const=flag.value, help=flag.help
            )
        return
    if option.kind == "bool":  # a flag that stores True
        group.add_argument(option.flag, action="store_const", const=True, help=option.help)
        return
    names = [option.short, option.flag] if option.short else [option.flag]
    kwargs: dict = {"help": option.help, "metavar": option.metavar}
    if option.kind in ("int", "float"):
        kwargs["type"] = _number(option)
    elif option.kind == "alpha":
        kwargs["type"] = _alpha(option)
    elif option.kind in ("patterns", "pairs"):
        kwargs |= {"nargs": "+", "action": "extend"}
    elif option.kind == "choice":
        kwargs["choices"] = list(option.choices)
        if option.const is not None:
            kwargs |= {"nargs": "?", "const": option.const}
        else:
            del kwargs["metavar"]
    group.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``%quantize`` parser, from the option table. Every default is None so that given
    options can be told apart from defaults (a ``%%quantize`` line and its recipe must not
    both set one key)."""
    parser = _Parser(
        prog="%quantize",
        usage="%%quantize MODEL [--calib DATA] [--method ptq|qat] [options]\n"
        "       %%%%quantize MODEL [options]   (cell body: a YAML recipe with the same keys)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        add_help=False,
        allow_abbrev=False,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=100),
    )
    model = BY_NAME["model"]
    parser.add_argument(model.name, nargs="?", metavar=model.metavar, help=model.help)
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for option in OPTIONS:
        if option is not model:
            _add(groups[option.group], option)
    return parser


PARSER = build_parser()
HELP = PARSER.format_help()
OPTION_KEYS: tuple[str, ...] = tuple(dict.fromkeys(action.dest for action in PARSER._actions))


def parse_line(line: str) -> dict[str, Any]:
    """The options given on a ``%quantize`` line, as ``{key: value}`` (absent ones left out)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"%quantize: cannot split the line ({exc}); check the quotes") from None
    namespace = PARSER.parse_args(words)
    return {key: value for key, value in vars(namespace).items() if value is not None}
