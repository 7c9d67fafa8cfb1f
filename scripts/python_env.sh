# Sourced by the entry points and demos. Sets PY, the Python they run: $PYTHON if set, else the project's
# .venv, else python3. Puts the repository root on PYTHONPATH, so the problem folders import `common` with
# any Python that has the requirements, pip-installed project or not (a course grader's environment).
_HW2_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$_HW2_ROOT/.venv/bin/python" ]; then PY="$_HW2_ROOT/.venv/bin/python"
else PY=python3
fi
export PYTHONPATH="$_HW2_ROOT${PYTHONPATH:+:$PYTHONPATH}"
