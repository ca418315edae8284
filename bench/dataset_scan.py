"""What a start spends on the dataset's images before training, cold and on a restart.

    python bench/dataset_scan.py [--images 5000] [--size 512]

Writes a shapes dataset of that many images (PNG, ``--size`` pixels) and times the
trainer's scan of it (difftrain.trainer.data.image_sizes, one process): the first start
decodes every image; a restart on the node reads what that scan kept and decodes none.
The row to read is the ratio of the restart's time to the first start's.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difftrain.shapes import write_dataset
from difftrain.trainer import data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        folder = write_dataset(Path(work) / "data", count=args.images, size=args.size)
        examples = data.find_examples(folder)
        scans = Path(work) / "scans"
        rows = []
        for label in ("first start (decodes all)", "restart (scan kept)"):
            start = time.perf_counter()
            data.image_sizes(examples, scans, "rank0")
            rows.append((label, time.perf_counter() - start))
    base = rows[0][1]
    print(f"{len(examples)} images of {args.size} px")
    for label, seconds in rows:
        print(f"{label:28s} {seconds:8.2f} s  {seconds / base:6.3f}x")


if __name__ == "__main__":
    main()
