"""Exact resume, checked the way the robustness audit of issue 18 broke it: a training run killed with
SIGKILL the moment its first last.ckpt is on disk, then --resume, must end with the same bytes as the run
that was never interrupted (on CPU)."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO, child_env

# Runs a trainer's main(argv) in a fresh process whose checkpoint writer sends the process SIGKILL right
# after the first last.ckpt has been renamed into place: the earliest moment a `kill -9` watching for the
# file could strike. The thread count is the test process's, so every run does the same arithmetic.
KILL_AFTER_FIRST_CHECKPOINT = """
import importlib, json, os, signal, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
from common.lightning_utils import AtomicCheckpointIO
save = AtomicCheckpointIO.save_checkpoint
def save_then_die(self, checkpoint, path, storage_options=None):
    save(self, checkpoint, path, storage_options)
    os.kill(os.getpid(), signal.SIGKILL)
AtomicCheckpointIO.save_checkpoint = save_then_die
importlib.import_module(sys.argv[2]).main(json.loads(sys.argv[3]))
"""


def train_killed_after_first_checkpoint(module: str, argv: list[str]) -> None:
    """Run `module`.main(argv) in a subprocess that is killed (SIGKILL) right after its first last.ckpt."""
    import json
    r = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, str(torch.get_num_threads()), module,
                        json.dumps(argv)], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=child_env())
    assert r.returncode == -signal.SIGKILL, f"not killed (exit {r.returncode}): {r.stderr[-3000:]}"


def checkpoint_state(path: Path) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return {"global_step": ck["global_step"], "state_dict": ck["state_dict"],
            "optimizer_states": ck["optimizer_states"], "lr_schedulers": ck.get("lr_schedulers")}


def assert_same_tensors(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, equal to the bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), f"{where}: keys differ"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        diff = (a.double() - b.double()).abs().max().item() if a.numel() and a.is_floating_point() else None
        assert torch.equal(a, b), f"{where}: tensors differ (max difference {diff})"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def output_files(out: Path) -> dict[str, bytes]:
    """Every file under `out` (but the CSV logs, which a resumed run starts anew, and last.ckpt, compared
    tensor by tensor) by its relative path."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if p.is_file() and "logs" not in rel.parts and rel.name != "last.ckpt":
            files[str(rel)] = p.read_bytes()
    return files


def assert_resumed_run_is_exact(straight: Path, resumed: Path, ckpt: str = "last.ckpt") -> None:
    """The resumed run's last.ckpt (weights, EMA, optimiser, schedule; `ckpt` relative to the output folder) and
    every file it wrote equal the uninterrupted run's, byte for byte."""
    assert_same_tensors(checkpoint_state(straight / ckpt), checkpoint_state(resumed / ckpt), ckpt)
    a, b = output_files(straight), output_files(resumed)
    assert sorted(a) == sorted(b), f"files differ: {sorted(set(a) ^ set(b))}"
    differing = [name for name in a if a[name] != b[name]]
    assert not differing, f"files with other bytes: {differing}"
