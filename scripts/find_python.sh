#!/usr/bin/env bash
# Print the Python the entry points run: $PYTHON if set, else the project's .venv, else python3.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"
else echo python3
fi
