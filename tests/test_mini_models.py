"""The shipped mini Stable Diffusion (issue 16): it loads both as its diffusers folder and as the LDM-keyed
single file the project exports, to the same outputs. Its quality measurements are in BENCHMARKS.md."""
from __future__ import annotations

import torch

from tests.conftest import REPO

MINI_SD = REPO / "checkpoints" / "mini_sd"


def test_mini_sd_loads_as_folder_and_as_exported_single_file(tmp_path):
    import common.stable_diffusion as sdlib
    from common.mini_sd import export_single_file, read_info
    info = read_info(MINI_SD)
    assert info["native_resolution"] == 64 and {"vae", "unet"} <= set(info["stages"])
    folder = sdlib.load_sd(str(MINI_SD))
    assert folder.native_resolution == 64 and folder.unet.dtype == torch.float32
    single = sdlib.load_sd(str(export_single_file(folder, tmp_path / "mini_sd.safetensors")))
    assert single.native_resolution == 64
    torch.manual_seed(0)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        cond = sdlib.encode_prompts(folder.tokenizer, folder.text_encoder, ["red circle with pink background", ""],
                                    "cpu")
        cond2 = sdlib.encode_prompts(single.tokenizer, single.text_encoder, ["red circle with pink background", ""],
                                     "cpu")
        a = folder.unet(z, t, encoder_hidden_states=cond).sample
        b = single.unet(z, t, encoder_hidden_states=cond2).sample
        x = folder.vae.decode(z).sample
        y = single.vae.decode(z).sample
    assert torch.equal(cond, cond2) and torch.allclose(a, b, atol=1e-5) and torch.allclose(x, y, atol=1e-5)
