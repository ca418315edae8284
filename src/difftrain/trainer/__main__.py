"""``python -m difftrain.trainer``: train the job in ``$DIFFTRAIN_CONFIG``.

Exit codes follow the operator-trainer contract: 0 success, 2 invalid spec or config,
3 dataset error, 4 storage access denied, anything else retryable. The reason is also
written as one line of JSON to the termination log (``$DIFFTRAIN_TERMINATION_LOG``,
default ``/dev/termination-log``) for the operator to show; on success the main process
writes there what the status shows of its outputs (the registered model version).
"""

import contextlib
import errno
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from difftrain.errors import DifftrainError, DiskFull, InvalidSpec

TERMINATION_LOG = "/dev/termination-log"
MESSAGE_LIMIT = 3500  # the kubelet keeps 4096 bytes of a termination message


def write_termination_log(reason: str, message: str, outputs: dict | None = None) -> None:
    path = Path(os.environ.get("DIFFTRAIN_TERMINATION_LOG", TERMINATION_LOG))
    said = {"reason": reason, "message": message[:MESSAGE_LIMIT]}
    if outputs:
        said["outputs"] = outputs  # what status.outputs shows beside the model's URI
    line = json.dumps(said)
    with contextlib.suppress(OSError):  # not in a pod, or not writable: the log still tells
        path.write_text(line + "\n")


def _quiet_libraries() -> None:
    """The libraries' warnings off, and their bars too (our own say what happens), but
    the Hugging Face Hub's download bars where bars are wanted (difftrain.bars)."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub
    from transformers.utils import logging as transformers_logging

    from difftrain import bars

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()
    if bars.wanted():
        hub.enable_progress_bars()
    else:
        hub.disable_progress_bars()


def main() -> int:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"
    )
    try:
        from difftrain.api.config import TrainerConfig

        source = os.environ.get("DIFFTRAIN_CONFIG")
        if not source:
            raise InvalidSpec("DIFFTRAIN_CONFIG is not set: it must name the job.json to train")
        try:
            text = Path(source).read_text()
        except OSError as error:
            raise InvalidSpec(f"cannot read DIFFTRAIN_CONFIG {source}: {error.strerror}") from None
        config = TrainerConfig.from_json(text, source)
        # A bad config fails above in a fraction of a second; torch and diffusers load now.
        from difftrain.trainer.loop import run

        _quiet_libraries()
        outputs = run(config)
        if outputs:
            write_termination_log("Succeeded", "training finished", outputs)
        return 0
    except DifftrainError as error:
        return _failed(error)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk is named, not a crash
            where = error.filename or "a local file"
            fix = "raise spec.resources.scratchSize or give the node more disk"
            return _failed(DiskFull(f"no space left writing {where}: {fix}"))
        return _crashed(error)
    except Exception as error:
        return _crashed(error)


def _failed(error: DifftrainError) -> int:
    logging.getLogger("difftrain").error("%s: %s", error.reason, error)
    write_termination_log(error.reason, str(error))
    return error.exit_code


def _crashed(error: Exception) -> int:
    traceback.print_exc()
    write_termination_log("Error", f"{type(error).__name__}: {error}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
