"""One-line user errors: a bad file or flag ends the program with a message, never a traceback."""
from __future__ import annotations

import functools
import signal
import sys
import threading


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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is (as Ctrl-C raises KeyboardInterrupt), so that `finally` blocks and
    common.fileio.all_or_nothing clean up before the program exits."""


def _raise_terminated(signum, frame):
    raise Terminated()


def cli_main(fn=None, *, sigterm: bool = False):
    """Wrap a `main()` so a UserError prints `error: ...` on stderr and exits 2, and Ctrl-C prints one line and
    exits 130. With sigterm=True (the commands that write outputs, not the Lightning trainers, which handle
    SIGTERM themselves), SIGTERM is handled like Ctrl-C: one line, exit 143, temp files removed on the way out.

    Use as `@cli_main` or `@cli_main(sigterm=True)`."""
    if fn is None:
        return functools.partial(cli_main, sigterm=sigterm)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        install = sigterm and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if install else None
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Terminated:
            print("terminated (SIGTERM); no partial output was kept", file=sys.stderr)
            sys.exit(143)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        finally:
            if install:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return wrapper
