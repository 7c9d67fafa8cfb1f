"""One-line user errors: a bad file or flag ends the program with a message, never a traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """An error caused by the user's input (a file, a flag); printed as one line, exit status 2."""


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
