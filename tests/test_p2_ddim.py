"""P2: the face UNet against the course manifest, DDIM on it against diffusers, slerp/lerp, hw2_2.sh end to end,
evaluate_mse, the figures and the benchmark writer, and bad inputs. All on CPU with a width-32 model."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from common.ddim import ddim_step, sample_ddim
from common.errors import UserError
from common.schedules import alphas_cumprod, make_betas
from p2_ddim.infer import face_alphas_cumprod, load_noises, sample_faces_ddim
from p2_ddim.infer import main as infer_main
from p2_ddim.interpolation import interpolate, lerp, slerp
from p2_ddim.model import FaceUNet, SelfAttention, load_face_unet
from tests.conftest import REPO, SHARED, convs_are_channels_last, run_cli, shared_data

MANIFEST = SHARED / "dlcv" / "face_unet_state_dict.txt"
FAST = ["--steps", "2", "--quiet"]
SMALL = 32  # GroupNorm has 32 groups: the smallest width


def read_manifest() -> dict[str, tuple[int, ...]]:
    shared_data()  # skips, counted in the run's closing line, when ../shared/data is absent
    if not MANIFEST.is_file():
        pytest.skip(f"manifest not present at {MANIFEST}")
    out = {}
    for line in MANIFEST.read_text().splitlines():
        if line.strip():
            name, shape = line.split()
            out[name] = tuple(int(s) for s in shape.split("x"))
    return out


def small_model(seed: int = 0) -> FaceUNet:
    torch.manual_seed(seed)
    return FaceUNet(base_channels=SMALL).eval()


def write_face_dir(root: Path, count: int, seed: int) -> Path:
    """An hw2_data/face-like folder: noise/00.pt.. (count of them, (1,3,64,64)) and a width-32 UNet.pt."""
    (root / "noise").mkdir()
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        torch.save(torch.randn(1, 3, 64, 64, generator=g), root / "noise" / f"{i:02d}.pt")
    torch.save(small_model().state_dict(), root / "UNet.pt")
    return root


@pytest.fixture(scope="module")
def face_dir(tmp_path_factory) -> Path:
    return write_face_dir(tmp_path_factory.mktemp("face"), count=4, seed=5)


# ---------------------------------------------------------------- the model


def test_state_dict_names_and_shapes_equal_the_manifest():
    ref = read_manifest()
    with torch.device("meta"):
        model = FaceUNet()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(ref)  # same names, same order
    assert got == ref
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 113.7


def test_random_manifest_state_dict_loads_strictly_into_full_width(tmp_path):
    ref = read_manifest()
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) * 0.01 for k, shape in ref.items()}
    path = tmp_path / "UNet.pt"
    torch.save(sd, path)
    model = load_face_unet(path)
    assert model.base_channels == 128
    own = model.state_dict()
    for k in ("time.0.inv_freq", "down14.attention.qkv.weight", "up23.resblocks.skip.bias", "out.2.weight"):
        assert torch.equal(own[k], sd[k]), k
    del model, own, sd


def test_time_embedding_is_the_stored_sinusoid():
    m = FaceUNet(base_channels=128, dropout=0.0)
    k = torch.arange(64, dtype=torch.float64)
    assert torch.allclose(m.time[0].inv_freq.double(), torch.exp(-math.log(10000) * 2 * k / 128), rtol=1e-6)
    assert "time.0.inv_freq" in m.state_dict()
    t = torch.tensor([0, 7, 980])
    e = m.time[0](t)
    s = t.double()[:, None] * m.time[0].inv_freq.double()[None]
    assert torch.allclose(e.double(), torch.cat([s.sin(), s.cos()], 1), atol=1e-4)  # sines first


def test_attention_is_one_head_softmax_over_positions():
    torch.manual_seed(1)
    att = SelfAttention(64)
    x = torch.randn(2, 64, 4, 5)
    n = att.norm(x)
    q, k, v = att.qkv(n).flatten(2).chunk(3, dim=1)  # (B, C, N) each
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(64), dim=-1)  # softmax over keys j
    ref = x + att.out(torch.einsum("bij,bcj->bci", w, v).reshape(x.shape))
    assert torch.allclose(att(x), ref, atol=1e-5)


def test_resblock_follows_the_description():
    torch.manual_seed(2)
    m = small_model()
    blk = m.down8.resblocks  # 32 -> 64 channels: has a 1x1 skip
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 128)
    silu = torch.nn.functional.silu
    h = blk.conv1(silu(blk.norm1(x))) + blk.time[1](silu(temb))[:, :, None, None]
    ref = blk.conv2(silu(blk.norm2(h))) + blk.skip(x)
    assert torch.allclose(blk(x, temb), ref, atol=1e-5)
    assert isinstance(m.down9.resblocks.skip, torch.nn.Identity)


def test_small_width_forward():
    m = small_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = m(x, torch.tensor([0, 980]))
        y2 = m(x, torch.tensor([500, 500]))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert not torch.allclose(y, y2)  # the timestep matters
    with pytest.raises(ValueError):
        FaceUNet(base_channels=48)


# ---------------------------------------------------------------- DDIM


def _float64_ddim():
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sched.betas = make_betas("linear", 1000)
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = alphas_cumprod(sched.betas)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_one_ddim_step_equals_diffusers_on_the_model_output(eta):
    model = small_model()
    sched = _float64_ddim()
    sched.set_timesteps(50)
    ab = face_alphas_cumprod().tolist()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for t in (980, 500, 0):
        with torch.no_grad():
            eps = model(x, torch.full((2,), t))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
        ref = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        ours, _ = ddim_step(x, eps, ab[t], ab[t - 20] if t >= 20 else 1.0, eta=eta, noise=z)
        assert torch.allclose(ours, ref, atol=1e-5), t


@pytest.mark.parametrize("offset", [0, 1])
def test_ddim_trajectory_equals_diffusers_with_timestep_offset(offset):
    model = small_model()
    sched = _float64_ddim()
    sched.set_timesteps(4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    ref = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model(ref, torch.full((2,), int(t) + offset))  # the model sees t (+1); alpha-bar is taken at t
            ref = sched.step(eps, t, ref).prev_sample
    ours = sample_ddim(model, x, face_alphas_cumprod(), num_steps=4, timestep_offset=offset)
    assert torch.allclose(ours, ref, atol=1e-4)
    other = sample_ddim(model, x, face_alphas_cumprod(), num_steps=4, timestep_offset=1 - offset)
    assert not torch.allclose(ours, other, atol=1e-4)


def test_ddim_eta0_deterministic_eta_positive_follows_seed():
    model = small_model()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    idx = [0, 1, 2]
    a = sample_faces_ddim(model, x, idx, steps=3, eta=0.0, seed=1, batch_size=3)
    b = sample_faces_ddim(model, x, idx, steps=3, eta=0.0, seed=2, batch_size=3)
    assert torch.equal(a, b)  # eta 0: no randomness at all
    c1 = sample_faces_ddim(model, x, idx, steps=3, eta=0.5, seed=1, batch_size=3)
    c2 = sample_faces_ddim(model, x, idx, steps=3, eta=0.5, seed=1, batch_size=3)
    d = sample_faces_ddim(model, x, idx, steps=3, eta=0.5, seed=2, batch_size=3)
    assert torch.equal(c1, c2) and not torch.allclose(c1, d) and not torch.allclose(c1, a)
    # the fresh noise is keyed on the noise index, not the batch: one at a time gives the same images
    single = sample_faces_ddim(model, x, idx, steps=3, eta=0.5, seed=1, batch_size=1)
    assert torch.allclose(c1, single, atol=1e-4)
    # and image 1 alone (index 1) is the same as in the batch
    alone = sample_faces_ddim(model, x[1:2], [1], steps=3, eta=0.5, seed=1, batch_size=1)
    assert torch.allclose(alone[0], c1[1], atol=1e-4)


# ---------------------------------------------------------------- slerp / lerp


def _classic_slerp(a, b, alpha):
    a64, b64 = a.double().flatten(), b.double().flatten()
    theta = torch.arccos((a64 @ b64) / (a64.norm() * b64.norm()))
    out = (torch.sin((1 - alpha) * theta) * a64 + torch.sin(alpha * theta) * b64) / torch.sin(theta)
    return out.reshape(a.shape)


def test_slerp_lerp_endpoints_and_norms():
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(1, 3, 64, 64, generator=g), torch.randn(1, 3, 64, 64, generator=g)
    for fn in (slerp, lerp):
        assert torch.equal(fn(a, b, 0.0), a) and torch.equal(fn(a, b, 1.0), b)
        assert fn(a, b, 0.5).dtype == a.dtype and fn(a, b, 0.5).shape == a.shape
    assert torch.allclose(lerp(a, b, 0.3), 0.7 * a + 0.3 * b, atol=1e-6)
    # equal norms: the rotation form is the textbook formula, and the norm is kept along the path
    b_eq = b * (a.norm() / b.norm())
    for al in (0.1, 0.5, 0.9):
        assert torch.allclose(slerp(a, b_eq, al).double(), _classic_slerp(a, b_eq, al), atol=1e-5)
        assert slerp(a, b_eq, al).norm().item() == pytest.approx(a.norm().item(), rel=1e-6)
    # two Gaussian noises are nearly orthogonal: slerp keeps the norm, lerp shrinks it by ~1/sqrt(2)
    mid_s, mid_l = slerp(a, b, 0.5).norm().item(), lerp(a, b, 0.5).norm().item()
    assert mid_s == pytest.approx((a.norm().item() + b.norm().item()) / 2, rel=1e-6)
    assert mid_l / mid_s == pytest.approx(1 / math.sqrt(2), abs=0.02)
    rows = interpolate(a[0], b[0], [i / 10 for i in range(11)], "slerp")
    assert rows.shape == (11, 3, 64, 64) and torch.equal(rows[0], a[0]) and torch.equal(rows[-1], b[0])
    with pytest.raises(ValueError):
        slerp(a, b[..., :32], 0.5)


def test_slerp_parallel_and_opposite_stay_finite():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(3, 16, 16, generator=g)
    tiny = 1e-7 * torch.randn(3, 16, 16, generator=g)
    for al in (0.0, 0.25, 0.5, 1.0):
        for b in (a.clone(), 2 * a, a + tiny):  # (nearly) parallel: the path is the straight line
            s = slerp(a, b, al)
            assert torch.isfinite(s).all()
            assert torch.allclose(s, lerp(a, b, al), atol=1e-5)
        for b in (-a, -a + tiny):  # (nearly) opposite: half a great circle, norm kept
            s = slerp(a, b, al)
            assert torch.isfinite(s).all()
            assert s.norm().item() == pytest.approx(a.norm().item(), rel=1e-5)
        if al in (0.0, 1.0):
            assert torch.equal(slerp(a, -a, al), a if al == 0 else -a)
    mid = slerp(a, -a, 0.5).double().flatten()
    assert abs(mid @ a.double().flatten()) < 1e-6 * a.norm().item() ** 2  # orthogonal to both ends
    z = torch.zeros_like(a)
    assert torch.isfinite(slerp(z, a, 0.5)).all() and torch.isfinite(slerp(a, z, 0.5)).all()


# ---------------------------------------------------------------- hw2_2.sh and infer


def _env():
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")


def test_hw2_2_sh_end_to_end(face_dir, tmp_path, capsys):
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(REPO / "hw2_2.sh"), str(face_dir / "noise"), str(out), str(face_dir / "UNet.pt")]
                       + FAST, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00.png", "01.png", "02.png", "03.png"]
    for p in out.iterdir():
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
            arr = np.asarray(im)
        assert arr.min() == 0 and arr.max() == 255  # min-max normalised on its own
    # the same images one noise at a time, in process
    one = tmp_path / "one"
    infer_main(["--noise-dir", str(face_dir / "noise"), "--out", str(one), "--unet", str(face_dir / "UNet.pt"),
                "--batch-size", "1"] + FAST)
    for name in ("00.png", "03.png"):
        x = np.asarray(Image.open(out / name), dtype=int)
        y = np.asarray(Image.open(one / name), dtype=int)
        assert np.abs(x - y).max() <= 1
    r = subprocess.run(["bash", str(REPO / "hw2_2.sh"), "a", "b"], capture_output=True, text=True, env=_env())
    assert r.returncode != 0 and "usage" in r.stderr


def test_infer_accepts_3d_noise_and_offset_changes_images(face_dir, tmp_path):
    noise = tmp_path / "noise"
    noise.mkdir()
    torch.save(torch.load(face_dir / "noise" / "00.pt")[0], noise / "00.pt")  # (3,H,W)
    stems, x, idx = load_noises(noise)
    assert stems == ["00"] and x.shape == (1, 3, 64, 64) and idx == [0]
    infer_main(["--noise-dir", str(noise), "--out", str(tmp_path / "a"), "--unet", str(face_dir / "UNet.pt")] + FAST)
    infer_main(["--noise-dir", str(noise), "--out", str(tmp_path / "b"), "--unet", str(face_dir / "UNet.pt"),
                "--timestep-offset", "1", "--clip-x0"] + FAST)
    assert (tmp_path / "a" / "00.png").read_bytes() != (tmp_path / "b" / "00.png").read_bytes()


def test_infer_bad_inputs(face_dir, tmp_path, capsys):
    good_noise, good_unet = face_dir / "noise", face_dir / "UNet.pt"

    def noise_dir(name, tensors):
        d = tmp_path / name
        d.mkdir()
        for stem, obj in tensors.items():
            torch.save(obj, d / f"{stem}.pt")
        return d

    x = torch.randn(1, 3, 64, 64)
    nan = x.clone()
    nan[0, 1, 5, 5] = float("nan")
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), other)
    partial = tmp_path / "partial.pt"
    sd = torch.load(good_unet)
    sd.pop("up23.resblocks.skip.weight")
    torch.save(sd, partial)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good_unet.read_bytes()[:2000])
    not_sd = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_sd)
    cases = [
        (tmp_path / "no_such_dir", good_unet, "no_such_dir"),
        (noise_dir("empty", {}), good_unet, "no .pt noise files"),
        (noise_dir("shape4", {"00": x, "01": torch.randn(2, 3, 64, 64)}), good_unet, "01.pt"),
        (noise_dir("shape2", {"00": torch.randn(3, 64)}), good_unet, "00.pt"),
        (noise_dir("gray", {"00": torch.randn(1, 1, 64, 64)}), good_unet, "(1, 1, 64, 64)"),
        (noise_dir("mixed", {"00": x, "01": torch.randn(1, 3, 32, 32)}), good_unet, "01.pt"),
        (noise_dir("nan", {"00": x, "07": nan}), good_unet, "07.pt"),
        (noise_dir("ints", {"00": torch.zeros(1, 3, 64, 64, dtype=torch.long)}), good_unet, "float"),
        (noise_dir("odd", {"00": torch.randn(1, 3, 40, 40)}), good_unet, "multiple of 32"),
        (noise_dir("empty_noise", {"00": torch.randn(1, 3, 0, 0)}), good_unet, "positive multiple of 32"),
        (noise_dir("dict", {"00": {"x": x}}), good_unet, "expected a tensor"),
        (good_noise, tmp_path / "missing_UNet.pt", "missing_UNet.pt"),
        (good_noise, other, "other.pt"),
        (good_noise, partial, "partial.pt"),
        (good_noise, corrupt, "corrupt.pt"),
        (good_noise, not_sd, "tensor.pt"),
    ]
    for i, (noise, unet, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, err = run_cli(infer_main, ["--noise-dir", str(noise), "--out", str(out), "--unet", str(unet)] + FAST,
                            capsys)
        assert code == 2, (needle, err)
        assert needle in err and len(err.strip().splitlines()) == 1, (needle, err)
        assert not out.exists()  # nothing written, not even the folder
    code, err = run_cli(infer_main, ["--noise-dir", str(good_noise), "--out", str(tmp_path / "o"), "--unet",
                                     str(good_unet), "--steps", "0"], capsys)
    assert code == 2 and "--steps" in err
    with pytest.raises(UserError, match="other.pt"):
        load_face_unet(other)


# ---------------------------------------------------------------- evaluate_mse


def _png(path: Path, arr) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def test_evaluate_mse_known_values(tmp_path, capsys):
    from scripts.evaluate_mse import main as mse_main
    gt, pred = tmp_path / "GT", tmp_path / "pred"
    _png(gt / "00.png", np.zeros((8, 8, 3)))
    _png(pred / "00.png", np.full((8, 8, 3), 10))            # every value off by 10 -> 100
    _png(gt / "01.png", np.full((8, 8, 3), 200))
    off = np.full((8, 8, 3), 200)
    off[..., 2] = 230                                         # one channel off by 30 -> 900 / 3 = 300
    _png(pred / "01.png", off)
    mean = mse_main(["--pred", str(pred), "--gt", str(gt), "--json", str(tmp_path / "m.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["00.png 100.0000", "01.png 300.0000", "mean mse 200.0000"]
    assert mean == pytest.approx(200.0)
    assert '"mean": 200.0' in (tmp_path / "m.json").read_text()


def test_evaluate_mse_bad_inputs(tmp_path, capsys):
    from scripts.evaluate_mse import main as mse_main
    gt, pred = tmp_path / "GT", tmp_path / "pred"
    _png(gt / "00.png", np.zeros((8, 8, 3)))
    _png(gt / "01.png", np.zeros((8, 8, 3)))
    _png(pred / "00.png", np.zeros((8, 8, 3)))
    code, err = run_cli(mse_main, ["--pred", str(pred), "--gt", str(gt)], capsys)
    assert code == 2 and "01.png" in err and "missing prediction" in err
    _png(pred / "01.png", np.zeros((8, 8, 3)))
    _png(pred / "02.png", np.zeros((8, 8, 3)))
    code, err = run_cli(mse_main, ["--pred", str(pred), "--gt", str(gt)], capsys)
    assert code == 2 and "02.png" in err and "no ground truth" in err
    (pred / "02.png").unlink()
    _png(pred / "01.png", np.zeros((16, 8, 3)))
    code, err = run_cli(mse_main, ["--pred", str(pred), "--gt", str(gt)], capsys)
    assert code == 2 and "01.png" in err and "differs" in err and len(err.strip().splitlines()) == 1
    (pred / "01.png").write_bytes(b"not a png")
    code, err = run_cli(mse_main, ["--pred", str(pred), "--gt", str(gt)], capsys)
    assert code == 2 and "01.png" in err
    code, err = run_cli(mse_main, ["--pred", str(tmp_path / "nope"), "--gt", str(gt)], capsys)
    assert code == 2 and "nope" in err


# ---------------------------------------------------------------- figures, demo, benchmark


def test_experiments_eta_grid_and_interpolation(face_dir, tmp_path, capsys):
    from p2_ddim.experiments import main as exp_main
    common = ["--noise-dir", str(face_dir / "noise"), "--unet", str(face_dir / "UNet.pt")] + FAST
    exp_main(["eta-grid", "--out", str(tmp_path / "eta.png")] + common)
    with Image.open(tmp_path / "eta.png") as im:
        w, h = im.size
    assert 4 * 64 < w < 4 * 64 + 200 and 5 * 64 < h < 5 * 64 + 100  # 5 rows x 4 columns plus labels
    for mode in ("slerp", "lerp"):
        exp_main(["interpolate", "--mode", mode, "--out", str(tmp_path / f"{mode}.png")] + common)
        with Image.open(tmp_path / f"{mode}.png") as im:
            w, h = im.size
        assert 11 * 64 < w < 11 * 64 + 200 and 64 < h < 64 + 100
    code, err = run_cli(exp_main, ["interpolate", "--mode", "slerp", "--pair", "00,09",
                                   "--out", str(tmp_path / "x.png")] + common, capsys)
    assert code == 2 and "09.pt" in err
    code, err = run_cli(exp_main, ["eta-grid", "--out", str(tmp_path / "x.jpg")] + common, capsys)
    assert code == 2 and ".png" in err
    for etas, said in (("0,nan", "finite"), ("0,-1", ">= 0"), (",", "comma-separated")):
        code, err = run_cli(exp_main, ["eta-grid", "--etas", etas, "--out", str(tmp_path / "x.png")] + common, capsys)
        assert code == 2 and "--etas" in err and said in err, err
    assert not (tmp_path / "x.png").exists()


def test_demo_p2_without_face_dir_says_what_it_needs(tmp_path):
    env = dict(_env(), OUT=str(tmp_path / "demo_out"))  # the skip record goes there, not into the repository
    env.pop("FACE_DIR", None)
    r = subprocess.run(["bash", str(REPO / "scripts" / "demo_p2.sh")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0
    assert "FACE_DIR" in r.stdout and "UNet.pt" in r.stdout and "noise" in r.stdout


def test_bench_p2_writes_its_section_only(tmp_path, capsys):
    from scripts.bench_p2 import main as bench_main
    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n<!-- bench_p1 start -->\nP1 TABLE\n<!-- bench_p1 end -->\n")
    argv = ["--base-channels", "32", "--size", "32", "--count", "2", "--steps", "1", "--device", "cpu",
            "--write", str(md)]
    bench_main(argv)
    bench_main(argv)  # a second run replaces the section
    text = md.read_text()
    assert "P1 TABLE" in text and text.count("<!-- bench_p2 start -->") == 1
    assert "one at a time" in text and "Command: `python scripts/bench_p2.py" in text


def test_noise_folder_skips_dot_files_and_names_a_file(face_dir, tmp_path):
    d = tmp_path / "noise"
    d.mkdir()
    for f in (face_dir / "noise").iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "._00.pt").write_bytes(b"\x00\x05macOS resource fork")
    stems, x, _ = load_noises(d)
    assert stems == ["00", "01", "02", "03"] and x.shape[0] == 4
    with pytest.raises(UserError, match="00.pt: is a file, not a folder"):
        load_noises(d / "00.pt")


def test_noise_folder_takes_an_upper_case_suffix(face_dir, tmp_path):
    """NAME.PT (saved on Windows) was skipped without a word, while the image listers take .PNG; the output
    names stay the stems, and 02.pt beside 02.PT (one output) is refused."""
    d = tmp_path / "noise"
    d.mkdir()
    for f in (face_dir / "noise").iterdir():
        (d / (f.stem + (".PT" if f.stem in ("01", "03") else f.suffix))).write_bytes(f.read_bytes())
    stems, x, idx = load_noises(d)
    _, want, want_idx = load_noises(face_dir / "noise")
    assert stems == ["00", "01", "02", "03"] and idx == want_idx and torch.equal(x, want)
    assert load_noises(d, only=["03", "00"])[0] == ["03", "00"]
    (d / "02.PT").write_bytes((d / "02.pt").read_bytes())
    with pytest.raises(UserError, match=r"02\.pt: 02\.PT is there too; both would be written as 02\.png"):
        load_noises(d)


def test_channels_last_branch_forced_on_the_cpu_gives_the_same_images(face_dir, monkeypatch):
    """The CUDA branch of load_model and sample_faces_ddim (channels_last weights and inputs), run on the CPU:
    the images stay the same (the DDIM arithmetic must not depend on the memory layout)."""
    import p2_ddim.infer as infer
    _, x, idx = load_noises(face_dir / "noise")
    cpu = torch.device("cpu")
    plain = sample_faces_ddim(infer.load_model(face_dir / "UNet.pt", cpu), x, idx, steps=3, eta=0.5, seed=1,
                              batch_size=3)
    monkeypatch.setattr(infer, "channels_last_pays", lambda device: True)
    model = infer.load_model(face_dir / "UNet.pt", cpu)
    assert convs_are_channels_last(model)
    nhwc = sample_faces_ddim(model, x, idx, steps=3, eta=0.5, seed=1, batch_size=3)
    assert torch.allclose(plain, nhwc, atol=1e-4), (plain - nhwc).abs().max()
