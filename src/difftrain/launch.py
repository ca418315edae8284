"""The trainer pods' entry point: ``torchrun --module difftrain.trainer``, passing the
trainer's exit code through.

torchrun itself exits 1 whenever a worker fails, which would hide the contract's codes
(2 invalid spec, 3 dataset error, 4 storage access denied) from the Job's
podFailurePolicy and the operator. This wrapper runs torchrun in-process, reading the
same ``PET_*`` variables, and exits with the first failed worker's own code (128 + N
for a worker killed by signal N, as a shell reports it).
"""

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        [*(sys.argv[1:] if argv is None else argv), "--module", "difftrain.trainer"]
    )
    try:
        run(args)
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode
    return 0


if __name__ == "__main__":
    sys.exit(main())
