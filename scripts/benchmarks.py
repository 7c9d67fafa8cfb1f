"""Helpers shared by the bench_* scripts: which device a number was taken on, and BENCHMARKS.md sections."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from common.fileio import write_text_atomic


def device_name(device: torch.device | str = "cpu") -> str:
    """A one-line description of the device timings were taken on."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}"


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
