"""The tree's conventions, checked from the source (cheap, no imports): imports point one way (scripts ->
problem folders -> common, no problem folder importing another), and the flags that mean one thing in every
command (--device, --precision) are defined in one place each, so every --help says the same."""
from __future__ import annotations

import ast
import re

from tests.conftest import REPO

PROBLEMS = ("p1_ddpm", "p2_ddim", "p3_controlnet", "p4_dann", "p5_personalization")


def _sources(*folders: str):
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py"))


def _imported_packages(path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imports_point_one_way():
    wrong = []
    for path in _sources("common"):
        wrong += [(path, n) for n in _imported_packages(path) if n in PROBLEMS or n in ("scripts", "tests")]
    for problem in PROBLEMS:
        for path in _sources(problem):
            wrong += [(path, n) for n in _imported_packages(path)
                      if n in ("scripts", "tests") or (n in PROBLEMS and n != problem)]
    assert not wrong, [(str(p.relative_to(REPO)), n) for p, n in wrong]


def test_device_and_precision_flags_have_one_home():
    """Commands add --device and --precision through common.device's helpers (trainers: Lightning's flags in
    common.lightning_utils), never by hand."""
    pattern = re.compile(r"""add_argument\(\s*["']--(device|precision)["']""")
    homes = {"common/device.py", "common/lightning_utils.py"}
    found = []
    for path in _sources("common", "scripts", *PROBLEMS):
        rel = str(path.relative_to(REPO))
        found += [(rel, m.group(1)) for m in pattern.finditer(path.read_text()) if rel not in homes]
    assert not found, found


def _commands() -> list[str]:
    """Every command's module name: the files of the problem folders and scripts/ that build a parser."""
    names = []
    for path in _sources(*PROBLEMS, "scripts"):
        text = path.read_text()
        if "ArgumentParser(" in text and '__name__ == "__main__"' in text:
            names.append(".".join(path.relative_to(REPO).with_suffix("").parts))
    return names


class _Shown(Exception):
    pass


def _parsers(module_name: str, monkeypatch) -> list:
    """The parser(s) behind `module --help` (with its sub-commands'), caught as it would print its help."""
    import argparse
    import importlib
    caught = []

    def catch(self, file=None):
        caught.append(self)
        raise _Shown

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", catch)
    module = importlib.import_module(module_name)
    try:
        module.main(["--help"])
    except (_Shown, SystemExit):
        pass
    assert caught, f"{module_name}: main(['--help']) printed no help"
    parsers = list(caught)
    for action in caught[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    return parsers


def test_every_option_has_help_and_shows_its_default(monkeypatch):
    """The guide's "every default has one home, shown by --help": no option of any command without a help
    text, and none whose default (not None or off) its --help does not show."""
    import argparse
    missing = []
    for name in _commands():
        for parser in _parsers(name, monkeypatch):
            formatter = parser._get_formatter()
            for action in parser._actions:
                if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                if not action.option_strings:  # a positional argument: its help says what to give
                    if not (action.help or "").strip():
                        missing.append(f"{name} {action.dest}: no help")
                    continue
                flag = action.option_strings[-1]
                if not re.sub(r"\(default: [^)]*\)", "", action.help or "").strip():
                    missing.append(f"{name} {flag}: no help (or only its default)")
                    continue
                # identity: `in (None, False, ...)` would also skip 0 and 0.0 (0 == False)
                if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
                    continue
                shown = formatter._expand_help(action) if "%" in formatter._get_help_string(action) else \
                    formatter._get_help_string(action)
                if "default" not in shown.lower():
                    missing.append(f"{name} {flag}: default {action.default!r} not shown")
    assert not missing, "\n".join(missing)


def test_trainers_share_the_flags_of_one_idea(monkeypatch):
    """Every trainer (a command with --resume) says how long it trains with --max-steps, and every one that
    validates says how often with --val-every (P5's --steps and P3's --sample-every take them as aliases)."""
    wrong = []
    for name in _commands():
        for parser in _parsers(name, monkeypatch):
            flags = parser._option_string_actions
            if "--resume" not in flags:
                continue
            wrong += [f"{name}: no --max-steps"] if "--max-steps" not in flags else []
            validates = any(f in flags for f in ("--val-every", "--val-count", "--val-share", "--limit-val-batches"))
            wrong += [f"{name}: no --val-every"] if validates and "--val-every" not in flags else []
    assert not wrong, "\n".join(wrong)


def test_image_side_takes_both_names(monkeypatch):
    """An image side is --size in some commands and --resolution in others (diffusers' training scripts call it
    that): every command with one takes the other as the same option."""
    wrong = []
    for name in _commands():
        for parser in _parsers(name, monkeypatch):
            flags = parser._option_string_actions
            if "--size" in flags or "--resolution" in flags:
                if flags.get("--size") is not flags.get("--resolution"):
                    wrong.append(name)
    assert not wrong, "\n".join(wrong)


def test_help_texts_keep_their_line_continuations():
    """A module docstring is its command's --help; a shell example's trailing backslash in a plain string
    joins the two lines (the --help then shows one line with a run of spaces): such docstrings are raw."""
    joined = []
    for path in _sources(*PROBLEMS, "scripts", "common"):
        src = path.read_text()
        body = ast.parse(src).body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            seg = ast.get_source_segment(src, body[0].value)
            if re.search(r"(?<!\\)(\\\\)*\\\n", seg) and not seg.lower().startswith("r"):
                joined.append(str(path.relative_to(REPO)))
    assert not joined, joined


# flags that count something: 0 or less is never meant (0-means-off flags such as --sample-every are not here)
COUNT_FLAGS = ("--batch-size", "--max-steps", "--max-epochs", "--val-every", "--accumulate", "--epochs",
               "--images-per-prompt", "--vectors", "--save-every", "--generate-n", "--n-images", "--val-count",
               "--unet-layers", "--text-layers", "--val-prompts", "--val-steps", "--limit", "--num-nodes", "--steps",
               "--n", "--jobs", "--tsne-count", "--per-prompt", "--top-k", "--threads", "--denoise-frames", "--count",
               "--vae-layers", "--checkpoint-every")


def test_numbers_are_checked_when_parsed(monkeypatch):
    """Every float flag refuses nan and inf, and every counting flag refuses 0, at the parser: argparse's
    one-line error naming the flag, before anything is loaded or written (the hand-written checks they
    replace once came after the output folder was made, or not at all)."""
    import argparse
    wrong = []
    for name in _commands():
        for parser in _parsers(name, monkeypatch):
            for action in parser._actions:
                if not action.option_strings or action.type is None or isinstance(action, argparse._HelpAction):
                    continue
                flag = action.option_strings[-1]
                probes = []
                if action.type is float or \
                        getattr(action.type, "__name__", "") in ("float", "finite_float") or \
                        getattr(action.type, "__name__", "").startswith("list of") and \
                        "float" in action.type.__name__:
                    probes = ["nan", "inf"]
                if flag in COUNT_FLAGS:
                    probes.append("0")
                for probe in probes:
                    try:
                        value = action.type(probe)
                    except (argparse.ArgumentTypeError, ValueError, TypeError):
                        continue
                    wrong.append(f"{name} {flag} takes {probe!r} (as {value!r})")
    assert not wrong, "\n".join(wrong)
