"""The quickstart, timed: wall time, peak memory, and whether its samples follow prompts.

    python bench/quickstart.py [--manifest examples/quickstart.yaml] [--nodes N]

Runs ``difftrain run`` on the manifest with its output moved to a temporary folder,
samples the resident memory of the whole process tree (the CLI and every node's
processes together) twice a second, and afterwards judges the final samples: for each
prompt "a COLOUR SHAPE on a BACKGROUND background", the colour, shape and background
drawn must be the prompt's (``difftrain.shapes.judge``).
"""

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from difftrain import shapes


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total


def judge(samples: Path) -> dict[str, list[str]]:
    """The prompts whose samples in ``samples`` are wrong, by what is wrong (colour,
    shape, background), and all of them (``all``)."""
    from PIL import Image

    index = json.loads((samples / "prompts.json").read_text())
    wrong = {"all": [], "colour": [], "shape": [], "background": []}
    for entry in index:
        wrong["all"].append(entry["prompt"])
        for what in shapes.judge(entry["prompt"], Image.open(samples / entry["file"])):
            wrong[what].append(entry["prompt"])
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default="examples/quickstart.yaml")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--grid", type=Path, help="copy the final sample grid here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        manifest = yaml.safe_load(Path(args.manifest).read_text())
        manifest["spec"]["output"]["uri"] = f"file://{work / 'out'}"
        path = work / "job.yaml"
        path.write_text(yaml.safe_dump(manifest))
        difftrain = Path(sys.executable).parent / "difftrain"
        command = [str(difftrain), "run", str(path), "--workdir", str(work)]
        if args.nodes:
            command += ["--nodes", str(args.nodes)]
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        watched, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            peak = max(peak, tree_rss(watched))
            time.sleep(0.5)
        wall = time.perf_counter() - start
        if child.returncode != 0:
            sys.exit(f"difftrain run failed ({child.returncode}): {child.stderr.read().decode()}")
        samples = max((work / "out" / "samples").iterdir())
        wrong = judge(samples)
        total = len(wrong.pop("all"))
        if args.grid:
            shutil.copyfile(samples / "grid.png", args.grid)
        entries = [json.loads(x) for x in (work / "out" / "metrics.jsonl").open()]
        print(
            json.dumps(
                {
                    "wall_seconds": round(wall, 1),
                    "peak_memory_mib": round(peak / 2**20),
                    "final_loss": round(entries[-1]["loss"], 4),
                    "samples": samples.name,
                    **{f"{what}_right": f"{total - len(w)}/{total}" for what, w in wrong.items()},
                    "wrong": wrong,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
