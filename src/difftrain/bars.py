"""Progress bars for long work someone may be watching: downloads, cache filling,
class images, evaluation.

A bar shows where a person watches: on a terminal (stderr is a TTY), or where ``difftrain
run`` asks for one (:data:`~difftrain.contract.PROGRESS_ENV` set to 1 in the main node's
environment: it relays that node's output to its own terminal); 0 there turns them off.
Elsewhere, in a pod's logs, a bar is a no-op and the logs stay one line per event.
"""

import os
import sys

from tqdm import tqdm

from difftrain import contract


def wanted() -> bool:
    """Whether bars are shown in this process: the first of its node's (the others'
    would draw over it), where someone watches."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return False
    said = os.environ.get(contract.PROGRESS_ENV)
    return said == "1" if said is not None else sys.stderr.isatty()


def bar(total: int | None, description: str, unit: str = "it") -> tqdm:
    """A bar over ``total`` units (bytes when ``unit`` is ``B``); a no-op where none is
    wanted."""
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        disable=not wanted(),
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
        leave=True,
    )
