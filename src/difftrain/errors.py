"""Error types shared by the CLI, the operator and the trainer.

Each error carries a machine-readable ``reason`` and the process exit code of the
operator-trainer contract (DESIGN.md: 2 invalid spec, 3 dataset, 4 storage access,
143 stopped on a signal after a checkpoint); ``contract.py`` derives its tables from them.
Errors are raised where a problem is detected and turned into a message and an exit
code in one place per entry point.
"""


class DifftrainError(Exception):
    """A problem the user can fix; ``str(error)`` is the message to show."""

    reason = "Error"
    exit_code = 1


class InvalidSpec(DifftrainError):
    """The job manifest or config does not satisfy the API."""

    reason = "InvalidSpec"
    exit_code = 2


class DatasetError(DifftrainError):
    """The dataset cannot be used (empty, too many unreadable images)."""

    reason = "DatasetError"
    exit_code = 3


class StorageAccessDenied(DifftrainError):
    """The object store refused us: bad credentials, no permission, no such bucket."""

    reason = "StorageAccessDenied"
    exit_code = 4


class StorageUnavailable(DifftrainError):
    """The object store could not be reached; retrying later may work."""

    reason = "StorageUnavailable"
    exit_code = 1


class RegistryUnavailable(DifftrainError):
    """The model registry could not be reached or failed; the model is already saved, and
    retrying later registers it."""

    reason = "RegistryUnavailable"
    exit_code = 1


class DiskFull(DifftrainError):
    """A node-local folder has no room for what must be written there; retrying on the
    same size of disk would fail at the same point."""

    reason = "DiskFull"
    exit_code = 2


class Stopped(DifftrainError):
    """Training stopped on SIGTERM (or SIGINT) after writing a checkpoint; a restart
    resumes."""

    reason = "Stopped"
    exit_code = 143
