"""One "node" of a multi-node test run (tests/test_multinode.py): runs a trainer's main(argv) in this process and
records, for the test to check, what this rank did. Test-only; the trainers have no hooks for it.

    python tests/multinode_rank.py RECORD MODULE ARGV_JSON

RECORD: a JSON file written at the end with this rank's global rank and world size, the training batches it
read (position -> item indices, from common.step_batches.BatchStream.indices), the files it wrote under --out
(every open for writing, os.replace / os.rename target, seen by an audit hook: the safetensors writer is not
Python, but its atomic rename is) and the exit code; RECORD + ".pt" holds the LightningModule's final state_dict.
Runs with one thread, as the test's other runs, so that every process does the same arithmetic.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path


def main() -> None:
    record_path, module_name, argv = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    out = Path(argv[argv.index("--out") + 1]).absolute()
    written: list[str] = []

    def under_out(path) -> str | None:
        try:
            p = Path(os.fsdecode(path)).absolute()
        except TypeError:  # a file descriptor
            return None
        return str(p.relative_to(out)) if p.is_relative_to(out) else None

    def audit(event: str, args) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            rel = under_out(path) if writes else None
        elif event in ("os.rename", "os.replace"):
            rel = under_out(args[1])
        else:
            return
        if rel is not None and "write-check" not in rel:  # check_writable's probe: every rank makes one
            written.append(rel)

    sys.addaudithook(audit)

    import torch
    torch.set_num_threads(1)
    import pytorch_lightning as pl

    from common.step_batches import BatchStream

    reads: dict[int, list[int]] = {}
    indices = BatchStream.indices

    def recorded_indices(self, position: int):
        idx = indices(self, position)
        reads[int(position)] = [int(i) for i in idx]
        return idx

    BatchStream.indices = recorded_indices

    fitted = {}
    fit = pl.Trainer.fit

    def recorded_fit(self, model, *args, **kwargs):
        fitted["trainer"], fitted["module"] = self, model
        return fit(self, model, *args, **kwargs)

    pl.Trainer.fit = recorded_fit
    code = 0
    try:
        importlib.import_module(module_name).main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    trainer = fitted.get("trainer")
    rank = trainer.global_rank if trainer is not None else int(os.environ.get("NODE_RANK", 0))
    if "module" in fitted:
        torch.save({k: v.detach().cpu() for k, v in fitted["module"].state_dict().items()},
                   f"{record_path}.pt")
    record = {"code": code, "global_rank": rank, "world_size": trainer.world_size if trainer is not None else None,
              "global_step": trainer.global_step if trainer is not None else None,
              "reads": {str(p): v for p, v in sorted(reads.items())}, "written": sorted(set(written))}
    record_path.write_text(json.dumps(record))
    sys.exit(code)


if __name__ == "__main__":
    main()
