"""The difftrain.io/v1alpha1 API: one set of models for the CRD, the operator and the trainer."""

from difftrain.api.job import API_VERSION, KIND, DiffusionTrainingJob
from difftrain.api.spec import DiffusionTrainingJobSpec
from difftrain.api.status import DiffusionTrainingJobStatus

__all__ = [
    "API_VERSION",
    "KIND",
    "DiffusionTrainingJob",
    "DiffusionTrainingJobSpec",
    "DiffusionTrainingJobStatus",
]
