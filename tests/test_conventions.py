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
