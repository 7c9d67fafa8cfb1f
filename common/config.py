"""One home for a trainer's hyper-parameters: a dataclass whose fields are the flags.

Each trainer declares `@dataclass class ...Config` with a default and a help text per field
(`field(default=..., metadata={"help": ...})`). `add_config_flags` turns the fields into command-line
flags that show the real defaults in `--help`; `config_from_args` reads them back; the dataclass (as a
dict) is what the LightningModule saves with its checkpoint and what the exported JSON records. Per-task
or per-scenario defaults are other instances of the same dataclass (`dataclasses.replace`), so a value
is written once.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any

from common.errors import UserError

# "range" metadata of config fields (see add_config_flags)
POSITIVE = {"low": 0, "low_open": True}
NON_NEGATIVE = {"low": 0}
AT_LEAST_1 = {"low": 1}
SHARE = {"low": 0, "high": 1}  # a probability
BELOW_1 = {"low": 0, "high": 1, "high_open": True}  # a decay or dropout rate
UP_TO_1 = {"low": 0, "low_open": True, "high": 1}  # a share that cannot be 0 (a crop's smallest scale)
OPEN_SHARE = {"low": 0, "low_open": True, "high": 1, "high_open": True}  # a mix of two kinds, both present


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(the scalar type of a field, whether None is allowed) from `int`, `float | None`, ..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"config fields take one type (or it | None), got {annotation}")
        return args[0], True
    return annotation, False


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's --help: the module docstring as written, and each option's default shown after its help
    unless the help already says it (`tests/test_conventions.py` checks every command has no option without
    help or with an unshown default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not `in (None, False, ...)`: 0 == False, so a default of 0 or 0.0 would go unshown
        default = action.default
        quiet = default is None or default is False or default is argparse.SUPPRESS
        unsaid = not quiet and "default" not in text.lower()
        if unsaid and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _number(kind: type, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """An argparse type: `kind` (int or float), finite, within [low, high] (open ends where asked); anything
    else is argparse's one-line error naming the flag (a NaN learning rate or guidance scale would otherwise
    run to the end and write NaN weights or black images)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        for bound, is_open, below in ((low, low_open, True), (high, high_open, False)):
            if bound is None:
                continue
            bad = (value <= bound if is_open else value < bound) if below else \
                (value >= bound if is_open else value > bound)
            if bad:
                sign = (">" if is_open else ">=") if below else ("<" if is_open else "<=")
                raise argparse.ArgumentTypeError(f"must be {sign} {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def finite_float(text: str) -> float:
    """argparse type of a float flag with no natural bounds (guidance, eta, a scale): finite."""
    return _number(float)(text)


def float_in(low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False):
    """argparse type of a finite float flag within bounds (`float_in(0, low_open=True)`: a learning rate)."""
    return _number(float, low, high, low_open, high_open)


def int_in(low: int, high: int):
    """argparse type of an integer flag within [low, high] (`int_in(1, 1000)`: steps of a 1000-step schedule)."""
    return _number(int, low, high)


def int_at_least(low: int):
    """argparse type of an integer flag with a lower bound (counts: `int_at_least(1)`)."""
    return _number(int, low=low)


def comma_list(base):
    """argparse type of a comma-separated, non-empty list of `base` values (`comma_list(float_in(0))`: etas);
    each item gets `base`'s check, and the error names the item that failed."""
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}")
        return [base(item) for item in items]
    parse.__name__ = f"list of {base.__name__}"
    return parse


def _parse_optional(base):
    """`base` (an argparse type), or None for 'none' or ''."""
    def parse(text: str):
        if text.lower() in ("none", ""):
            return None
        return base(text)
    parse.__name__ = base.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser, defaults, title: str | None = None) -> None:
    """One flag per field of the dataclass instance `defaults`, defaulting to its value.

    Field metadata: "help" (text), "choices" (allowed values), "flag" (False: not a flag, e.g. derived),
    "range" (for numbers: a dict of `_number`'s low / high / low_open / high_open, checked when parsed; floats
    are always checked finite), "aliases" (more option strings: the name other commands give the same idea,
    e.g. --max-steps for P5's --steps)."""
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(type(defaults))
    for f in dataclasses.fields(defaults):
        if f.metadata.get("flag", True) is False:
            continue
        value = getattr(defaults, f.name)
        kind, optional = _base_type(hints[f.name])
        text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"default": value, "dest": f.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            base = _number(kind, **f.metadata.get("range", {})) if kind in (int, float) else kind
            kwargs["type"] = _parse_optional(base) if optional else base
            if "choices" in f.metadata:
                kwargs["choices"] = tuple(f.metadata["choices"])
            if "metavar" in f.metadata:
                kwargs["metavar"] = f.metadata["metavar"]
        shown = "off" if value is None else value
        said = "default" in text.lower()  # a help that explains its own default (e.g. "off: the SD's size")
        kwargs["help"] = text if said else f"{text} (default: {shown})" if text else f"(default: {shown})"
        group.add_argument(flag_name(f.name), *f.metadata.get("aliases", ()), **kwargs)


def config_from_args(defaults, args: argparse.Namespace):
    """The dataclass instance the parsed flags describe (fields without a flag keep `defaults`' value)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(defaults) if hasattr(args, f.name)}
    return dataclasses.replace(defaults, **values)


def config_from_dict(cls, values: dict, source: str = "checkpoint"):
    """A config saved with `dataclasses.asdict`; fields missing from older files take the class default,
    unknown keys are an error naming `source`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{source}: unknown {cls.__name__} fields {', '.join(unknown)}")
    return cls(**values)


def pre_parse(argv, *flags: tuple[str, Any]) -> argparse.Namespace:
    """Read a few flags that choose the defaults (--task, --source ...) before the full parser is built,
    so `--help` can show the defaults that apply. Unknown flags and --help are left for the full parser."""
    p = argparse.ArgumentParser(add_help=False)
    for name, default in flags:
        p.add_argument(name, default=default)
    known, _ = p.parse_known_args(argv)
    return known


def explicit_flags(build_parser, argv) -> set[str]:
    """The dests of the flags given on the command line `argv` (not left at their defaults), for options
    whose absence means "take it from the checkpoint". `build_parser()` builds the same parser as the
    caller's; it is parsed again with every default suppressed."""
    p = build_parser()
    for action in p._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def resume_refusal(source, said: str, allowed: str | None = None) -> UserError:
    """The one-line error of a --resume whose flags differ from the run's: `said` says how it was trained
    ("with --lr 0.1 (not 0.5)", "on other concepts"), `allowed` (optional) what a resume may change."""
    return UserError(f"{source}: this run was trained {said}; --resume continues it as it was"
                     + (f" ({allowed})" if allowed else "") + "; start a new --out to train with other settings")


def resumed_config(config, saved: dict, given: set[str], *, may_change=(), source, program: str):
    """The config a --resume continues with. `config` is what the flags say now, `saved` the checkpoint's
    config (as a dict), `given` the dests of the flags on the command line (`explicit_flags`).

    A field whose flag was not given takes the checkpoint's value, so the run continues as it was and what
    it exports records what really trained (not today's defaults). A flag given with another value than the
    checkpoint's is a one-line UserError naming both, unless the field is in `may_change` (how long the run
    goes on, how often it validates): the optimiser state, the data order and the model are the
    checkpoint's, so a new learning rate or batch size would be recorded but not used, or would change the
    run under its own name."""
    try:
        old = config_from_dict(type(config), saved, str(source))
    except (UserError, TypeError) as e:
        raise UserError(f"{source}: not a checkpoint of {program} ({e})") from None
    changed = [f.name for f in dataclasses.fields(config)
               if f.name in given and f.name not in may_change and getattr(config, f.name) != getattr(old, f.name)]
    if changed:
        said = ", ".join(f"{flag_name(n)} {getattr(old, n)} (not {getattr(config, n)})" for n in changed)
        allowed = ", ".join(flag_name(n) for n in may_change)
        raise resume_refusal(source, f"with {said}", f"it may change only {allowed or 'none of its settings'}")
    return dataclasses.replace(old, **{n: getattr(config, n) for n in may_change if n in given})


def resumed_args(args: argparse.Namespace, saved: dict, given: set[str], *, source) -> None:
    """The same rule as resumed_config for the run's flags outside its config (--seed, --mode, the data sets a
    run adapts between ...): `saved` maps dests to the checkpoint's values; a flag left off takes it (set on
    `args`), a flag given with another value is a one-line UserError. Keys the checkpoint does not hold (files
    from before they were saved) are not checked."""
    changed = [k for k, v in saved.items() if k in given and getattr(args, k) != v]
    if changed:
        said = ", ".join(f"{flag_name(k)} {saved[k]} (not {getattr(args, k)})" for k in changed)
        raise resume_refusal(source, f"with {said}")
    for k, v in saved.items():
        setattr(args, k, v)
