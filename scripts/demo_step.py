#!/usr/bin/env python
"""Run one step of `make demo` and record it, so that scripts/demo_page.py reads numbers, not logs.

    python scripts/demo_step.py OUT NAME [--figure FIG.png --caption TEXT]... [--info KEY=VALUE]... -- CMD [ARGS...]
    python scripts/demo_step.py OUT NAME --skip "what it needs"

Runs CMD (its output goes to the terminal as usual), then writes OUT/steps/NAME.json:
{"name", "command", "seconds", "returncode"}; the command is written as typed, with the demo's Python
shown as `python`. Every --figure FIG.png (written by CMD) gets a sidecar FIG.png.json with its
--caption, the --info settings (checkpoint=..., sampler=..., steps=..., seed=...) and the command,
for commands that do not write one themselves. Exits with CMD's exit status. --skip records a step
that did not run, and why, in an OUT that exists (a demo part run on its own with nothing to do creates no
folder). NAME starts with the problem it belongs to: p1_, iclevr_, p2_ ... p5_.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common.config import HelpFormatter
from common.errors import UserError, cli_main
from common.figure_info import write_figure_info
from common.fileio import write_text_atomic


def display_command(cmd: list[str]) -> str:
    python = {os.environ.get("PY", ""), sys.executable}
    shown = ["python" if i == 0 and (arg in python or Path(arg).name.startswith("python")) else arg
             for i, arg in enumerate(cmd)]
    return shlex.join(shown)


def parse_info(items: list[str]) -> dict:
    info = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--info {item!r}: expected KEY=VALUE")
        info[key] = int(value) if value.lstrip("-").isdigit() else value
    return info


@cli_main
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, cmd = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("out", help="the demo's output folder (demo_out)")
    p.add_argument("name", help="step name, starting with its problem: p1_sample, iclevr_score_test, ...")
    p.add_argument("--figure", action="append", default=[], help="a PNG the command writes (repeatable)")
    p.add_argument("--caption", action="append", default=[], help="what that figure shows (one per --figure)")
    p.add_argument("--info", action="append", default=[], help="KEY=VALUE for the figures' sidecars")
    p.add_argument("--skip", default=None, help="record the step as not run, with this reason")
    args = p.parse_args(argv)
    if len(args.figure) != len(args.caption):
        raise UserError(f"{len(args.figure)} --figure but {len(args.caption)} --caption: give one caption a figure")
    if not args.name.replace("_", "").isalnum():
        raise UserError(f"step name {args.name!r}: use letters, digits and _ only")
    info = parse_info(args.info)
    record_path = Path(args.out) / "steps" / f"{args.name}.json"
    if args.skip is not None:
        if Path(args.out).is_dir():
            write_text_atomic(record_path, json.dumps({"name": args.name, "skipped": args.skip}, indent=2) + "\n")
        return
    if not cmd:
        raise UserError("no command: put it after --")
    shown = display_command(cmd)
    start = time.monotonic()
    try:
        rc = subprocess.run(cmd).returncode
    except OSError as e:
        raise UserError(f"{cmd[0]}: cannot run ({e.strerror or e})") from None
    seconds = time.monotonic() - start
    record = {"name": args.name, "command": shown, "seconds": round(seconds, 2), "returncode": rc}
    write_text_atomic(record_path, json.dumps(record, indent=2) + "\n")
    print(f"[{args.name}: {seconds:.1f} s]", file=sys.stderr)
    if rc == 0:
        for fig, caption in zip(args.figure, args.caption):
            if not Path(fig).is_file():
                raise UserError(f"{fig}: step {args.name} did not write this figure")
            write_figure_info(fig, caption, shown, **info)
    sys.exit(rc)


if __name__ == "__main__":
    main()
