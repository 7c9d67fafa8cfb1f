"""Where the project's own files are: shipped weights and sample inputs, found from any working directory."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO_ROOT / "checkpoints"
ASSETS = REPO_ROOT / "assets"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # the course data beside the repository, when it is there
