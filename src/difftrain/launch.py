"""The trainer pods' entry point: ``torchrun --module difftrain.trainer``, passing the
trainer's exit code through.

torchrun itself exits 1 whenever a worker fails, which would hide the contract's codes
(2 invalid spec, 3 dataset error, 4 storage access denied) from the Job's
podFailurePolicy and the operator. This wrapper runs torchrun in-process, reading the
same ``PET_*`` variables, and exits with the first failed worker's own code (128 + N
for a worker killed by signal N, as a shell reports it).

On SIGTERM (preemption, node drain, suspend) torchrun's agent forwards the signal to the
workers and kills them once its shutdown timeout has passed, 30 s unless told: far too
short to upload a large checkpoint. The timeout is therefore the pod's grace period
(``DIFFTRAIN_GRACE_SECONDS``, from ``spec.runPolicy.terminationGracePeriodSeconds``) less
a margin for the agent itself to exit, and the agent's signal exception becomes exit
code 128 + N instead of a traceback and exit 1.
"""

import os
import sys

# torchrun's own default, used when no grace period is given.
DEFAULT_SHUTDOWN_SECONDS = 30


def shutdown_timeout(grace: int) -> int:
    """Seconds the agent waits for stopping workers within a ``grace``-second period: the
    kubelet kills the whole pod at ``grace``, so the agent must be done a little before."""
    margin = max(2, min(15, grace // 10))
    return max(1, grace - margin)


def _agent_arguments(argv: list[str], env: dict) -> list[str]:
    """torchrun's arguments: ``argv``, the shutdown timeout unless given, and the module."""
    given = any(arg.startswith(("--shutdown-timeout", "--shutdown_timeout")) for arg in argv)
    extra = []
    if not given and "PET_SHUTDOWN_TIMEOUT" not in env:
        grace = env.get("DIFFTRAIN_GRACE_SECONDS", "")
        seconds = shutdown_timeout(int(grace)) if grace.isdigit() else DEFAULT_SHUTDOWN_SECONDS
        extra = [f"--shutdown-timeout={seconds}"]
    return [*argv, *extra, "--module", "difftrain.trainer"]


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    arguments = _agent_arguments(sys.argv[1:] if argv is None else argv, dict(os.environ))
    args = get_args_parser().parse_args(arguments)
    try:
        run(args)
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode
    except SignalException as stopped:  # the workers have had their time to checkpoint
        print(f"difftrain.launch: stopped by signal {stopped.sigval.name}", file=sys.stderr)
        return 128 + int(stopped.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
