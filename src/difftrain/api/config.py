"""The trainer's one input: ``job.json``, written by the operator (or ``difftrain run``)."""

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from difftrain.api.spec import DiffusionTrainingJobSpec
from difftrain.api.validation import problems_of
from difftrain.errors import InvalidSpec


class TrainerConfig(BaseModel):
    """The validated spec plus the identity of the job and of this gang attempt."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="metadata.name of the job.")
    namespace: str = Field("default", description="metadata.namespace of the job.")
    uid: str = Field("", description="metadata.uid of the job.")
    attempt: int = Field(1, ge=1, description="Gang attempt, from 1.")
    spec: DiffusionTrainingJobSpec = Field(description="The job's spec.")

    @classmethod
    def from_json(cls, text: str, source: str) -> "TrainerConfig":
        """Parse ``job.json``; :class:`InvalidSpec` names each problem's field."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as error:
            problems = "; ".join(str(p) for p in problems_of(error))
            raise InvalidSpec(f"{source}: {problems}") from None

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2)
