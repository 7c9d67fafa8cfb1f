"""Checkpoint I/O: weights as safetensors, with the model kind and config in its header and in a JSON beside it.

A checkpoint is `NAME.safetensors` (+ `NAME.json`, a human-readable copy of the config and the
metrics it reached). The header carries `kind` and `config`, so the .safetensors alone is enough
to rebuild the model; loading checks the kind and the parameter names/shapes and fails with one
line naming the file when they do not match.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.fileio import atomic_path, write_text_atomic


def sidecar_json(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def sort_metadata(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's header in place with its `__metadata__` keys sorted. safetensors keeps the
    metadata in a hash map, whose order varies from run to run; sorted, identical runs write identical bytes.
    Readers do not care about the order (the shipped checkpoints, written unsorted, read the same)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        if meta is None:
            return
        header = {"__metadata__": dict(sorted(meta.items())), **header}
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n:  # never: the same keys and values, only reordered
            raise RuntimeError(f"{path}: re-serialised safetensors header grew ({len(new)} > {n} bytes)")
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], kind: str,
                    config: dict[str, Any], metrics: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write weights (optionally cast to `dtype`) and the JSON sidecar, each atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: checkpoint path must end in .safetensors")
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().clone()
    header = {"kind": kind, "config": json.dumps(config, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
        sort_metadata(tmp)
    info = {"kind": kind, "config": config, "metrics": metrics or {}}
    write_text_atomic(sidecar_json(path), json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def _all_finite(v: torch.Tensor) -> bool:
    # a finite sum proves every element finite (NaN and infinity carry through a sum) and is far cheaper than
    # the element-wise test (32x to 76x on 1 GiB of fp32 on a 2-core CPU, BENCHMARKS.md), which matters for
    # SD's 4 GB; a sum that overflowed (a large fp16 tensor) or is not finite falls back to that test
    return bool(torch.isfinite(v.sum())) or bool(torch.isfinite(v).all())


def check_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """UserError naming the file and the first tensor that holds NaN or infinity (a diverged run's weights
    would otherwise load silently and give black images or constant outputs)."""
    for k, v in tensors.items():
        if torch.is_tensor(v) and v.is_floating_point() and not _all_finite(v):
            raise UserError(f"{path}: tensor {k!r} contains NaN or infinity (saved from a diverged run?)")


def read_checkpoint(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, config) of a checkpoint of `kind`; UserError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if path.suffix == ".ckpt":  # a trainer's last.ckpt (Lightning's, for --resume) given for its weights
            raise UserError(f"{path}: a training checkpoint (for --resume), not the weights; pass the "
                            f"model.safetensors (or best.safetensors) that the trainer exports beside it") from None
        raise UserError(f"{path}: not a readable safetensors checkpoint (truncated or corrupt?): {e}") from None
    found = meta.get("kind")
    if found != kind:
        raise UserError(f"{path}: checkpoint is of kind {found!r}, expected {kind!r} (a checkpoint of another model?)")
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: checkpoint header has a malformed config: {e}") from None
    check_finite(tensors, path)
    return tensors, config


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """load_state_dict(strict=True), casting to the model's dtypes; mismatch -> UserError naming the file."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the model: {len(missing)} missing "
                        f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    bad = [k for k in own if own[k].shape != state_dict[k].shape]
    if bad:
        k = bad[0]
        raise UserError(f"{path}: shape mismatch for {k}: file {tuple(state_dict[k].shape)}, "
                        f"model {tuple(own[k].shape)} ({len(bad)} tensors differ)")
    check_finite(state_dict, path)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True)


# ------------------------------------------------------------------------- Lightning checkpoints for --resume

def read_resume_checkpoint(path: str | os.PathLike, program: str, hparams: tuple[str, ...] = ()) -> dict:
    """The Lightning checkpoint that --resume names, read (memory-mapped) and checked before a trainer writes
    anything: a torch file holding a dict with 'state_dict', 'global_step' and the hyper-parameters `hparams`
    (which tell one trainer's checkpoint from another's). A truncated file, another program's checkpoint or
    not a checkpoint at all is a one-line UserError '<path>: not a checkpoint of <program> (...)'."""
    from common.errors import one_line
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a truncated zip, a pickle error, a file of another format
        raise UserError(f"{path}: not a checkpoint of {program} ({one_line(e)})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "global_step" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of {program} (not a Lightning checkpoint)")
    hp = ckpt.get("hyper_parameters")
    missing = [k for k in hparams if not isinstance(hp, dict) or k not in hp]
    if missing:
        raise UserError(f"{path}: not a checkpoint of {program} (it has no hyper-parameter {missing[0]!r})")
    return ckpt


def note_if_finished(path: str | os.PathLike, ckpt: dict, max_steps: int | None, flag: str = "--max-steps") -> None:
    """Say on stderr when the --resume checkpoint `ckpt` is already at the run's last step: Lightning would
    train nothing and end with only its own terse line, and the user meant to train on."""
    step = ckpt.get("global_step", 0)
    if max_steps is not None and max_steps > 0 and step >= max_steps:
        print(f"note: {path} is already at its last step ({step} of {max_steps}): nothing is left to train "
              f"(raise {flag} to train on)", file=sys.stderr)


def check_resume_fits(path: str | os.PathLike, ckpt: dict, module: torch.nn.Module, program: str,
                      keys=None, strict: bool = True) -> None:
    """UserError unless the module's tensors (those whose names pass `keys`, a predicate; default all) are in
    the --resume checkpoint `ckpt` (read_resume_checkpoint) with the same shapes, and (strict) the checkpoint
    holds no others: a checkpoint of a run with other settings fails here, in one line, not in Lightning."""
    state = ckpt["state_dict"]
    own = {k: v for k, v in module.state_dict().items() if keys is None or keys(k)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in state if (keys is None or keys(k)) and k not in own) if strict else []
    if missing or unexpected:
        raise UserError(f"{path}: not a checkpoint of this {program} run: {len(missing)} tensors missing "
                        f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for k, v in own.items():
        found = state[k]
        if not torch.is_tensor(found) or tuple(found.shape) != tuple(v.shape):
            shape = tuple(found.shape) if torch.is_tensor(found) else type(found).__name__
            raise UserError(f"{path}: tensor {k!r} is {shape} there, {tuple(v.shape)} in this run's model "
                            f"(trained with other settings? resume with the same flags, or start a new --out)")
