"""Issue 20: multi-node training, tested on this machine over loopback. Two "nodes" are two processes (one
per node, gloo on 127.0.0.1, a free port, MASTER_ADDR / MASTER_PORT / NODE_RANK / WORLD_SIZE as on a
general-purpose cluster) that train P1 (tiny) with --num-nodes 2 --devices 1. Each runs through
tests/multinode_rank.py, which records what its rank read and wrote and dumps its final weights.

Also: what --resume does when the world size changes (a two-node checkpoint resumed by one process)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, child_env

STEPS = 4
TIMEOUT_S = 240  # per run of the two processes together


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def p1_args(data: Path, out: Path, steps: int) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--batch-size", "8", "--channels", "8,16", "--val-every", "2",
            "--warmup-steps", "1", "--max-steps", str(steps), "--limit-val-batches", "1", "--seed", "3", "--quiet",
            "--accelerator", "cpu", "--devices", "1"]


def run_ranks(argv: list[str], records: Path, nodes: int, timeout: float = TIMEOUT_S) -> list[dict]:
    """Run P1's main(argv + --num-nodes `nodes`) as `nodes` processes, one per node; their records, by node rank.
    The processes are killed (if still running) whatever happens."""
    records.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    try:
        for node in range(nodes):
            env = child_env(OMP_NUM_THREADS="1")
            for k in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK"):
                env.pop(k, None)
            if nodes > 1:
                # a general-purpose cluster, one process per node (Lightning's LightningEnvironment launches the
                # node's devices itself, here one); gloo over the loopback interface
                env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node),
                           WORLD_SIZE=str(nodes), GLOO_SOCKET_IFNAME="lo")
            log = open(records / f"node{node}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "multinode_rank.py"), str(records / f"node{node}.json"),
                 "p1_ddpm.train", json.dumps(argv + ["--num-nodes", str(nodes)])],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for log in logs:
            log.close()
    out = []
    for node, p in enumerate(procs):
        tail = (records / f"node{node}.log").read_text()[-3000:]
        assert p.returncode == 0, f"node {node} exited {p.returncode}:\n{tail}"
        out.append(json.loads((records / f"node{node}.json").read_text()))
        out[-1]["weights"] = torch.load(records / f"node{node}.json.pt", map_location="cpu", weights_only=True)
    return out


@pytest.fixture(scope="module")
def two_nodes(digits_tree, tmp_path_factory):
    """A two-node run of STEPS steps: (its --out folder, the two ranks' records)."""
    root = tmp_path_factory.mktemp("two_nodes")
    out = root / "out"  # the one folder both nodes write to, as on a shared file system
    return out, run_ranks(p1_args(digits_tree, out, STEPS), root / "records", nodes=2)


def test_two_nodes_ddp_same_weights_own_shards_rank0_writes(two_nodes, digits_tree):
    from common.checkpoint import read_checkpoint
    from common.step_batches import BatchStream
    from p1_ddpm.data import DigitUnionDataset
    from p1_ddpm.model import CHECKPOINT_KIND
    out, ranks = two_nodes
    assert [r["global_rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["global_step"] == STEPS for r in ranks)

    # identical weights (model, EMA, buffers) on both ranks at the end
    a, b = ranks[0]["weights"], ranks[1]["weights"]
    assert sorted(a) == sorted(b)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"ranks ended with different weights: {differing[:5]}"

    # each rank read its own share: rank r the positions 2b + r of the run's stream, the items the one-process
    # stream (same seed) has at those positions; together every position once
    ds = DigitUnionDataset(digits_tree, "train")
    stream = BatchStream(ds, 8, seed=3, weights=ds.sample_weights(0.5))
    for r, rank in enumerate(ranks):
        positions = sorted(int(p) for p in rank["reads"])
        assert positions == [2 * b + r for b in range(STEPS)], (r, positions)
        for p, items in rank["reads"].items():
            assert items == stream.indices(int(p)).tolist()
    assert [ranks[0]["reads"][str(2 * b)] != ranks[1]["reads"][str(2 * b + 1)] for b in range(STEPS)] == [True] * STEPS

    # only rank 0 wrote: checkpoints, exports, samples, logs; rank 1 nothing under the shared --out
    assert ranks[1]["written"] == []
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    for name in ("last.ckpt", "model.safetensors", "model.json", "best.safetensors", "samples/step_000002.png",
                 f"samples/step_{STEPS:06d}.png"):
        assert name in on_disk and name in ranks[0]["written"], name
    assert set(on_disk) <= set(ranks[0]["written"]), sorted(set(on_disk) - set(ranks[0]["written"]))
    # what rank 0 exported is the EMA both ranks hold
    ema, _ = read_checkpoint(out / "model.safetensors", CHECKPOINT_KIND)
    assert all(torch.equal(ema[k], a[f"ema.module.{k}"]) for k in ema)
    assert torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == STEPS


def test_resume_two_nodes_on_one_ddp_is_refused(two_nodes, digits_tree, tmp_path):
    """A checkpoint of two processes resumed by one: a step's batches and noise are the positions 2 step, 2 step + 1
    of the run's stream; one process without accumulation would read other ones (batches the two already read),
    so the run stops before training, in one line saying why, and leaves the files there as they were."""
    src, ranks = two_nodes
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    argv = p1_args(digits_tree, out, STEPS + 2) + ["--resume", "--num-nodes", "1"]
    r = subprocess.run([sys.executable, "-m", "p1_ddpm.train", *argv], cwd=REPO, capture_output=True, text=True,
                       timeout=TIMEOUT_S, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr and "resume on 2 process(es)" in r.stderr, r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
