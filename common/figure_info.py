"""A report figure's sidecar: `FIG.png.json` says what FIG.png shows, which weights and sampler settings
made it, and the exact command that wrote it. scripts/demo_page.py captions each figure from it."""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from common.errors import UserError
from common.fileio import check_writable, write_text_atomic
from common.paths import REPO_ROOT


def figure_out(path: str | os.PathLike) -> Path:
    """A report script's --out: a .png path whose folder can be written (checked before any work)."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: --out must be a .png path")
    check_writable(out.parent if str(out.parent) else ".")
    return out


def sidecar_path(figure: str | os.PathLike) -> Path:
    return Path(f"{figure}.json")


def _short(path: str | os.PathLike) -> str:
    """A path as a reader would type it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except (ValueError, OSError):
        return str(path)


def command_line(script: str | os.PathLike, argv: list[str] | None = None) -> str:
    """`python <script> ARGS` as typed: the script relative to the repository, ARGS from argv or sys.argv."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", _short(script), *map(str, args)])


def write_figure_info(figure: str | os.PathLike, what: str, command: str, **settings) -> Path:
    """Write FIG.png.json: {what, checkpoint, sampler, steps, ..., command}; settings that are None are left out."""
    info: dict = {"what": what}
    for key, value in settings.items():
        if value is None:
            continue
        info[key] = _short(value) if key in ("checkpoint", "unet", "sd", "controlnet") else value
    info["command"] = command
    path = sidecar_path(figure)
    write_text_atomic(path, json.dumps(info, indent=2) + "\n")
    return path
