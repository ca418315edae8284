"""The examples/ folder: the DiffusionTrainingJob manifests, the DiffusionTrainingProfiles,
and the others (a Katib Experiment whose trials are jobs)."""

from pathlib import Path

import yaml

FOLDER = Path(__file__).resolve().parents[1] / "examples"
ALL = sorted(FOLDER.glob("*.yaml"))


def _kind(path: Path) -> str:
    first = next(d for d in yaml.safe_load_all(path.read_text()) if d)
    return first.get("kind", "")


JOBS = [path for path in ALL if _kind(path) == "DiffusionTrainingJob"]
PROFILES = [path for path in ALL if _kind(path) == "DiffusionTrainingProfile"]
