"""The examples/ folder: the DiffusionTrainingJob manifests, and the others (a Katib
Experiment whose trials are jobs)."""

from pathlib import Path

import yaml

FOLDER = Path(__file__).resolve().parents[1] / "examples"
ALL = sorted(FOLDER.glob("*.yaml"))


def _is_job(path: Path) -> bool:
    first = next(d for d in yaml.safe_load_all(path.read_text()) if d)
    return first.get("apiVersion", "").startswith("difftrain.io/")


JOBS = [path for path in ALL if _is_job(path)]
