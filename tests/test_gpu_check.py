"""scripts/gpu_check.sh: without a GPU it says so and leaves BENCHMARKS.md alone; its pieces run (tiny, CPU);
its runner keeps every piece inside its time limit."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts import gpu_check
from tests.conftest import REPO, child_env


def test_gpu_check_without_a_gpu_says_so_and_changes_nothing():
    bench = REPO / "BENCHMARKS.md"
    before = bench.read_bytes()
    stamp = bench.stat().st_mtime_ns
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this is the CPU case on every machine
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                       env=child_env(CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "needs a CUDA GPU" in r.stdout
    assert bench.read_bytes() == before and bench.stat().st_mtime_ns == stamp


def test_gpu_check_runner_ends_a_piece_at_its_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_START_S", 0)
    run = gpu_check.Runner(tmp_path, budget_s=60, tiny=False)
    pid_file = tmp_path / "child.pid"
    # the piece starts a child of its own: the timeout must end that one too (its process group)
    t0 = time.monotonic()
    r = run.run("sleepy", ["bash", "-c", f"sleep 30 & echo $! > {pid_file}; wait"], cap_s=1)
    assert time.monotonic() - t0 < 15
    assert not r["ok"] and r["timed_out"] and r["error"].startswith("timed out")
    pid = int(pid_file.read_text())
    for _ in range(50):  # the kill is delivered at once; give the kernel a moment to reap it
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the piece's child {pid} outlived the time limit")
    r = run.run("failing", [sys.executable, "-c", "raise SystemExit('boom: bad input')"], cap_s=30)
    assert not r["ok"] and r["error"] == "failed (exit 1): boom: bad input"
    # a piece is not started when the budget is spent
    monkeypatch.setattr(gpu_check, "MIN_START_S", 20)
    spent = gpu_check.Runner(tmp_path, budget_s=5, tiny=False)
    r = spent.run("late", [sys.executable, "-c", "print(1)"], cap_s=30)
    assert not r["ok"] and r["error"] == "not run: the time budget was spent" and r["rc"] is None


def test_gpu_check_tiny_end_to_end(tmp_path):
    """Every piece at tiny size on the CPU: the commands, flags and result parsing work (slow: ~4 min)."""
    bench = REPO / "BENCHMARKS.md"
    before = bench.read_bytes()
    out = tmp_path / "bench.md"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--tiny", "--budget", "1500",
                        "--write", str(out), "--logs", str(tmp_path / "work")],
                       capture_output=True, text=True, env=child_env(), timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = out.read_text()
    assert "<!-- gpu_check start -->" in text and "<!-- gpu_check end -->" in text
    assert "Tiny CPU dry run" in text and "Device: CPU" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith(("| check", "| ---"))]
    assert len(rows) == len(gpu_check.PIECES), rows
    for ln in rows:
        assert "failed" not in ln and "timed out" not in ln and "not run" not in ln, ln
    assert "1000 PNGs (mnistm/ 500, svhn/ 500)" in text  # the 2024 layout of hw2_1.sh
    assert "images/s" in text and "hw2_2.sh` end to end" in text and "s/step" in text and "it/s" in text
    assert "64 images of 64x64" in text
    assert bench.read_bytes() == before
