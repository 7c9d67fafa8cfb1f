"""One-line user errors: a bad file or flag ends the program with a message, never a traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """An error caused by the user's input (a file, a flag); printed as one line, exit status 2."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """A short one-line summary of an exception from torch.load (whose messages run over many lines)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    # weights_only refusals explain themselves on a later line ("Unsupported global: ...")
    detail = next((ln for ln in lines if "Unsupported" in ln), None)
    text = detail or lines[0].split(". ")[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}"


def cli_main(fn):
    """Wrap a `main()` so a UserError prints `error: ...` on stderr and exits 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
