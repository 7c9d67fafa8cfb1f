"""Helpers shared by the bench_* scripts: BENCHMARKS.md sections (device_name lives in common.device)."""
from __future__ import annotations

from pathlib import Path

from common.fileio import write_text_atomic


def replace_section(path: str | Path, name: str, body: str) -> None:
    """Put `body` between `<!-- name start -->` and `<!-- name end -->` in a markdown file (appended if absent)."""
    path = Path(path)
    start, end = f"<!-- {name} start -->", f"<!-- {name} end -->"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(path, text)
