"""Issue 18, audit item 1: a training run killed (SIGKILL) right after its first last.ckpt and resumed ends
bit-identical on CPU to the run that was never interrupted, in P1 (digits and i-CLEVR), P3, P4 and P5: every
weight, EMA and optimiser tensor of the final last.ckpt, and every file the runs export (weights, JSON,
best model and its metrics, sample grids), byte for byte."""
from __future__ import annotations

import json

import pytest
import torch

from tests.resume_check import assert_resumed_run_is_exact, train_killed_after_first_checkpoint
from tests.tiny_sd import TINY_IMAGE, write_tiny_sd

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _straight_killed_resumed(module: str, main, args: list[str], tmp_path, ckpt: str = "last.ckpt"):
    """The uninterrupted run, and the run killed after its first checkpoint then resumed; their folders."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(args + ["--out", str(straight)])
    train_killed_after_first_checkpoint(module, args + ["--out", str(resumed)])
    killed_at = torch.load(resumed / ckpt, map_location="cpu", weights_only=False)["global_step"]
    main(args + ["--out", str(resumed), "--resume"])
    return straight, resumed, killed_at


def test_p1_digits_resume_after_kill_is_exact(digits_tree, tmp_path):
    """Also: the step's validation, export and sample grid come before its checkpoint, so the grid of the
    checkpoint's step is there although the run was killed the moment the checkpoint appeared."""
    from p1_ddpm.train import main
    args = ["--data", str(digits_tree), "--batch-size", "8", "--channels", "8,16", "--val-every", "2",
            "--warmup-steps", "1", "--max-steps", "6", "--dropout", "0.1", "--limit-val-batches", "1", "--seed", "3",
            "--quiet"]
    straight, resumed, killed_at = _straight_killed_resumed("p1_ddpm.train", main, args, tmp_path)
    assert killed_at == 2
    assert_resumed_run_is_exact(straight, resumed)
    assert (resumed / "samples" / "step_000002.png").is_file()
    assert json.loads((straight / "model.json").read_text())["metrics"]["global_step"] == 6


def test_p1_iclevr_resume_after_kill_is_exact(tmp_path):
    from p1_ddpm.render_iclevr import main as render
    from p1_ddpm.train import main
    data = tmp_path / "iclevr"
    render(["--out", str(data), "--n", "40", "--seed", "2", "--labels-from", "random"])
    args = ["--task", "iclevr", "--data", str(data), "--batch-size", "4", "--channels", "8,16",
            "--val-every", "2", "--warmup-steps", "1", "--max-steps", "4", "--limit-val-batches", "1",
            "--seed", "1", "--quiet"]
    straight, resumed, killed_at = _straight_killed_resumed("p1_ddpm.train", main, args, tmp_path)
    assert killed_at == 2
    assert_resumed_run_is_exact(straight, resumed)
    assert (resumed / "samples" / "step_000002.png").is_file()


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    from p3_controlnet.make_fill50k import main
    out = tmp_path_factory.mktemp("fill50k")
    main(["--out", str(out), "--n", "14", "--n-test", "1", "--size", str(TINY_IMAGE), "--seed", "5"])
    return out


@pytest.mark.parametrize("loading", [["--num-workers", "0", "--ema-decay", "0.9"],
                                     ["--num-workers", "2", "--accumulate", "2"]],
                         ids=["in-process-ema", "workers-accumulate"])
def test_p3_resume_after_kill_is_exact(fill, tmp_path, loading):
    """The ControlNet, its EMA (--ema-decay, in-process), its optimiser, the exported controlnet/ folder and the
    sample grids; the prompt dropout, the latent sample, t and the noise of each step come from the step. Also with
    loader worker processes (which split the run's batches between them) and gradient accumulation (two loader
    batches a step)."""
    from p3_controlnet.train import main
    sd = write_tiny_sd(tmp_path / "sd", "ldm", seed=1)
    args = ["--sd", str(sd), "--data", str(fill), "--size", str(TINY_IMAGE), "--max-steps", "4", "--batch-size", "2",
            "--sample-every", "2", "--sample-steps", "2", "--val-count", "2", *loading, "--lr", "1e-3",
            "--proportion-empty-prompts", "0.5", "--seed", "2", "--quiet"]
    straight, resumed, killed_at = _straight_killed_resumed("p3_controlnet.train", main, args, tmp_path)
    assert killed_at == 2
    assert_resumed_run_is_exact(straight, resumed)


def test_p4_resume_after_kill_is_exact_and_picks_the_same_best(digits_tree, tmp_path):
    """DANN: source and target batches, augmentation and dropout; best.safetensors / best.json (the model chosen on
    the validation accuracy, with its metrics and the history of validations) are the uninterrupted run's."""
    from p4_dann.train import main
    args = ["--data", str(digits_tree), "--source", "mnistm", "--target", "svhn", "--mode", "dann",
            "--widths", "4,8,8", "--feature-dim", "16", "--batch-size", "16", "--refresh-rate", "0",
            "--val-every", "2", "--max-steps", "8", "--dropout", "0.3", "--seed", "4"]
    straight, resumed, killed_at = _straight_killed_resumed("p4_dann.train", main, args, tmp_path)
    assert killed_at == 2
    assert_resumed_run_is_exact(straight, resumed)
    ck = torch.load(resumed / "last.ckpt", map_location="cpu", weights_only=False)
    history = next(v["history"] for k, v in ck["callbacks"].items() if "ExportBest" in k)
    assert [h["global_step"] for h in history] == [2, 4, 6, 8]  # the validation of the killed step was not lost


def test_p5_resume_after_kill_is_exact(tmp_path):
    """P5 (whose earlier loader was exact only when the resumed part was no longer than the part done: its
    shortened loader ended Lightning's epoch early and the next epoch read the same photos again)."""
    from p5_personalization.train_ti import main
    from tests.conftest import SHARED
    from tests.tiny_sd import tiny_sd_components
    if not (SHARED / "dreambooth" / "dog").is_dir():
        pytest.skip(f"real data not present at {SHARED}")
    sd = write_tiny_sd(tmp_path / "sd", "diffusers", comps=tiny_sd_components(seed=0))
    args = ["--sd", str(sd), "--images", str(SHARED / "dreambooth" / "dog"), "--token", "<new1>", "--init-word", "dog",
            "--resolution", str(TINY_IMAGE), "--batch-size", "2", "--steps", "8", "--save-every", "2",
            "--sample-every", "4", "--sample-steps", "2", "--seed", "3", "--quiet"]
    straight, resumed, killed_at = _straight_killed_resumed("p5_personalization.train_ti", main, args, tmp_path,
                                                            ckpt="runs/new1/last.ckpt")
    assert killed_at == 2
    assert_resumed_run_is_exact(straight, resumed, ckpt="runs/new1/last.ckpt")


def test_p1_data_and_noise_do_not_depend_on_where_a_run_resumes(digits_tree):
    """The mechanism itself: the items of batch b are a function of (seed, b) (data epochs included), and each
    rank of a multi-process run reads its own positions."""
    from common.step_batches import BatchStream, StepBatches
    from p1_ddpm.data import DigitUnionDataset
    ds = DigitUnionDataset(digits_tree, "train")
    stream = BatchStream(ds, 16, seed=5, weights=ds.sample_weights(0.5))
    whole = list(StepBatches(stream, 20))  # several data epochs (120 images: 7 batches an epoch)
    fresh = BatchStream(ds, 16, seed=5, weights=ds.sample_weights(0.5))
    tail = list(StepBatches(fresh, 20, start=13))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[13:], tail))
    perm = BatchStream(ds, 16, seed=5)
    epoch0 = torch.cat([perm.indices(k) for k in range(perm.per_epoch)]).tolist()
    assert len(set(epoch0)) == len(epoch0) == perm.per_epoch * 16  # a permutation: no item twice in an epoch
    assert perm.order(1).tolist() != perm.order(0).tolist()  # a fresh order every data epoch
    # two ranks: rank r of 2 reads positions 2b + r, so together they read the one-process stream, each its share
    ranks = [[x[1] for x in StepBatches(perm, 3, rank=r, world_size=2)] for r in (0, 1)]
    one = [x[1] for x in StepBatches(perm, 6)]
    assert all(torch.equal(ranks[p % 2][p // 2], one[p]) for p in range(6))
