"""The DiffusionTrainingJob object: identity, naming limits and the whole-object rules."""

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from difftrain.api.base import raise_problems
from difftrain.api.cluster import MAX_ATTEMPTS
from difftrain.api.spec import DiffusionTrainingJobSpec
from difftrain.api.status import DiffusionTrainingJobStatus

GROUP = "difftrain.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DiffusionTrainingJob"
HOSTNAME_MAX = 63
# The job's name is the headless Service's name, so it must be a DNS-1035 label.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def pod_hostname(name: str, attempt: int, index: int) -> str:
    """The hostname of node ``index`` in gang attempt ``attempt`` (attempts count from 1)."""
    return f"{name}-a{attempt}-{index}"


def longest_hostname(name: str, spec: DiffusionTrainingJobSpec) -> str:
    """The longest pod hostname this job can produce over all attempts and nodes."""
    return pod_hostname(name, MAX_ATTEMPTS, spec.resources.nodes - 1)


class ObjectMeta(BaseModel):
    """The parts of metav1.ObjectMeta difftrain reads; the API server's other fields pass."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, description="Job name; also names its pods and Service.")
    namespace: str | None = Field(None, description="Namespace.")
    labels: dict[str, str] = Field({}, description="Labels.")
    annotations: dict[str, str] = Field({}, description="Annotations.")
    uid: str | None = Field(None, description="Set by the API server.")
    generation: int | None = Field(None, description="Set by the API server.")


class DiffusionTrainingJob(BaseModel):
    """A diffusion model training job (difftrain.io/v1alpha1)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["difftrain.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["DiffusionTrainingJob"]
    metadata: ObjectMeta
    spec: DiffusionTrainingJobSpec
    status: DiffusionTrainingJobStatus | None = None

    @model_validator(mode="after")
    def _name_fits_hostnames(self):
        name = self.metadata.name
        if not re.fullmatch(NAME_PATTERN, name):
            raise_problems(
                [
                    (
                        ("metadata", "name"),
                        "must start with a lowercase letter and hold only lowercase "
                        f"letters, digits and '-', as it names a Service (got '{name}')",
                    )
                ]
            )
        longest = longest_hostname(name, self.spec)
        if len(longest) > HOSTNAME_MAX:
            allowed = len(name) - (len(longest) - HOSTNAME_MAX)
            raise_problems(
                [
                    (
                        ("metadata", "name"),
                        "is too long: pod hostnames <name>-a<attempt>-<index> must fit in "
                        f"{HOSTNAME_MAX} characters; '{longest}' would have {len(longest)}, "
                        f"so shorten the name to at most {allowed} characters",
                    )
                ]
            )
        return self


# The same limits as CEL rules on the CRD's root (only metadata.name is visible there). A
# fieldPath cannot point into metadata, so the API server reports them without a field:
# each message starts with it.
ROOT_RULES = [
    {
        "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
        "message": "metadata.name must start with a lowercase letter and hold only lowercase "
        "letters, digits and '-', as it names a Service",
    },
    {
        # Without spec.resources.nodes (a profile may set it, or the default 1 holds), the
        # operator checks the merged spec.
        "rule": f"size(self.metadata.name) + {len(str(MAX_ATTEMPTS))} + "
        "(has(self.spec.resources) && has(self.spec.resources.nodes) ? "
        f"size(string(self.spec.resources.nodes - 1)) : 1) + 3 <= {HOSTNAME_MAX}",
        "message": "metadata.name is too long: pod hostnames <name>-a<attempt>-<index> must "
        f"fit in {HOSTNAME_MAX} characters",
    },
]
