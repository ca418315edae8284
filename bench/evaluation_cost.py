"""What evaluation costs: the quickstart with ``spec.evaluation`` beside the quickstart
without it, in the same invocation.

    python bench/evaluation_cost.py [--num-images 64] [--features 2048]
        [--inception FILE] [--clip FOLDER] [--no-baseline]

The evaluation: FID against ``builtin:shapes-large`` (1024 reference images), the CLIP
score and the held-out loss (5% of the dataset, 4 timesteps), every 600 steps and at the
end (steps 600 and 1200). Without ``--inception``/``--clip``, the test suite's evaluator
files are written (an InceptionV3 of the real architecture with random weights, which
costs what the real one does; a tiny CLIP, which costs far less than CLIP ViT-L/14).
Prints each evaluation's seconds (the first includes the reference images' features,
computed once per run), both runs' wall times and their ratio.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def manifest(folder: Path, evaluation: dict | None) -> Path:
    document = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec = document["spec"]
    spec["output"]["uri"] = f"file://{folder / 'out'}"
    if evaluation is not None:
        spec["evaluation"] = {**evaluation, "prompts": spec["validation"]["prompts"]}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def run(folder: Path, evaluation: dict | None) -> float:
    folder.mkdir(parents=True)
    job = manifest(folder, evaluation)
    command = [sys.executable, "-m", "difftrain.cli", "run", str(job)]
    command += ["--workdir", str(folder / "work")]
    started = time.perf_counter()
    with open(folder / "run.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--features", type=int, default=2048, choices=[64, 192, 768, 2048])
    parser.add_argument("--inception", help="InceptionV3 weights file (torch-fidelity's)")
    parser.add_argument("--clip", help="CLIP model folder")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain quickstart")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="difftrain-bench-") as temporary:
        folder = Path(temporary)
        sys.path.insert(0, str(ROOT))
        from tests import evaluators

        inception = args.inception or evaluators.write_inception(folder / "inception.pth")
        clip = args.clip or evaluators.write_clip(folder / "clip")
        evaluation = {
            "everySteps": 600,
            "numImages": args.num_images,
            "inferenceSteps": 20,
            "guidanceScale": 5,
            "fid": {
                "referenceUri": "builtin:shapes-large",
                "weightsUri": f"file://{Path(inception).resolve()}",
                "features": args.features,
            },
            "clipScore": {"modelUri": f"file://{Path(clip).resolve()}"},
            "validationLoss": {"fraction": 0.05, "timesteps": 4},
        }
        baseline = None if args.no_baseline else run(folder / "plain", None)
        evaluated = run(folder / "evaluated", evaluation)
        lines = (folder / "evaluated" / "out" / "metrics.jsonl").read_text().splitlines()
        scores = [json.loads(line)["evaluation"] for line in lines if '"evaluation"' in line]
    for entry in scores:
        print(
            f"evaluation at step {entry['step']}: {entry['seconds']:.1f} s "
            f"(fid {entry['fid']:.3f}, clipScore {entry['clipScore']:.3f}, "
            f"validationLoss {entry['validationLoss']:.4f})"
        )
    print(f"quickstart with evaluation: {evaluated:.1f} s")
    if baseline is not None:
        print(f"quickstart without:         {baseline:.1f} s (ratio {evaluated / baseline:.2f})")


if __name__ == "__main__":
    main()
