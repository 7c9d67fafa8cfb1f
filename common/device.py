"""Device and precision choice: CUDA runs bf16 autocast with TF32 matmuls, everything else exact fp32."""
from __future__ import annotations

import contextlib
import platform

import torch

from common.errors import UserError

# --precision, in every command: auto = bf16 autocast on CUDA GPUs with native bf16 (Ampere and later), exact
# fp32 elsewhere (older GPUs such as the T4 or V100 emulate bf16 more slowly than they run fp32)
PRECISIONS = ("auto", "fp32", "bf16")
# --device, in every command: the device types pick_device accepts (cuda may carry an index, cuda:1)
DEVICE_TYPES = ("cpu", "cuda", "mps")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise the named device, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES or (dev.type != "cuda" and dev.index is not None):
        raise UserError(f"--device must be one of {DEVICE_CHOICES}, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None:
        count = torch.cuda.device_count()
        if dev.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device{'s' * (count != 1)} "
                            f"(cuda:0 to cuda:{count - 1})")
    # without this check the first tensor moved there raises "PyTorch is not linked with support for mps"
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS (Apple GPU) is not available on this machine (use --device cpu)")
    return dev


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of an inference or evaluation command: 'auto' is bf16 on a CUDA GPU with native bf16
    (gpu_has_native_bf16) and none (fp32) elsewhere. 'fp32' also turns TF32 off (set_tf32), as its --help
    promises exact fp32: cuDNN would otherwise run convolutions in TF32 by default (a command with its own
    --tf32 flag sets it after this)."""
    if precision == "fp32":
        set_tf32(False)
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.bfloat16 if device.type == "cuda" and gpu_has_native_bf16(device) else None


def gpu_has_native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether a CUDA GPU (default: the current one) runs bf16 natively: compute capability 8.0 (Ampere) and
    later, or ROCm. Older GPUs (T4, V100) accept bf16 but emulate it, slower than fp32, so auto keeps fp32 there."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def wide_float(device: torch.device) -> torch.dtype:
    """The dtype of the schedule arithmetic done on `device` (1 - alpha_bar near t = T needs the digits):
    float64, except on MPS, which has no float64 (there float32, the best it has)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def add_device_flag(parser) -> None:
    """--device for the inference, evaluation and benchmark commands (the trainers take Lightning's
    --accelerator/--devices instead), with one help text everywhere."""
    parser.add_argument("--device", default="auto",
                        help=f"{DEVICE_CHOICES}; auto = cuda when there is one, else cpu (default: auto)")


def add_precision_flag(parser, default: str = "auto", what: str = "the network's forward pass") -> None:
    """--precision for the inference and evaluation commands, with the one vocabulary of PRECISIONS."""
    parser.add_argument("--precision", choices=PRECISIONS, default=default,
                        help=f"autocast of {what}: auto = bf16 on CUDA GPUs from Ampere on, else fp32; fp32 = exact; "
                             f"bf16 (default: {default})")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for `dtype`, or a no-op context when dtype is None. Every sampler takes its
    autocast as this dtype (`amp_dtype`) and opens the context itself."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lightning_precision(device_kind: str, precision: str = "auto", cpu_native_bf16: bool = False) -> str:
    """Lightning's precision string for --precision auto|fp32|bf16. auto: bf16 mixed on GPUs with native bf16
    (gpu_has_native_bf16), 32-bit on older ones; on CPUs 32-bit, or bf16 mixed when `cpu_native_bf16` is asked
    for and the CPU has native bf16 (avx512_bf16/AMX)."""
    if precision == "fp32":
        return "32-true"
    if precision == "bf16":
        return "bf16-mixed"
    if precision != "auto":
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device_kind in ("gpu", "cuda"):
        return "bf16-mixed" if gpu_has_native_bf16() else "32-true"
    return "bf16-mixed" if cpu_native_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def set_tf32(enabled: bool) -> None:
    """TF32 matmuls and convolutions on CUDA on or off (cuDNN allows TF32 by default; off = exact fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def channels_last_pays(device: torch.device | str) -> bool:
    """Whether the convolutional UNets run in channels_last (NHWC) on `device`: cuDNN's tensor-core kernels want
    it. A function, not an inline test, so that the tests can force that CUDA branch on the CPU (where it must
    give the same images)."""
    return torch.device(device).type == "cuda"


def fused_adamw_pays(device: torch.device | str) -> bool:
    """Whether AdamW uses its fused kernel on `device` (one launch per step on CUDA). The CPU keeps the default
    kernel, so CPU runs repeat the recorded ones to the bit; the tests force the fused branch on the CPU."""
    return torch.device(device).type == "cuda"


def setup_cuda_fast_math() -> None:
    """TF32 matmuls/convs on Ampere and later: a free speed-up for training, where bit-exactness is not owed."""
    if torch.cuda.is_available():
        set_tf32(True)
        torch.backends.cudnn.benchmark = True


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
