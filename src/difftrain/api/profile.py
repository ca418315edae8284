"""DiffusionTrainingProfile: platform defaults that short job manifests reference.

A platform team writes the image, resources, placement, storage, cache and run policy
once, in a cluster-scoped profile; a job names it in ``spec.profile`` and writes only what
it trains. The job's spec is the profile's groups with the job's own fields laid over them
(:func:`merge`): objects merge key by key (so ``requests``, ``limits`` and
``nodeSelector`` add to the profile's), and anything else the job sets, lists included,
replaces the profile's value. The operator merges once, at the job's first reconcile, and
keeps the profile's spec in the job's status (``status.profile``), so a profile changed or
deleted later never changes, or restarts, a job that already started.
"""

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from difftrain.api.base import ApiModel, raise_problems, with_rules
from difftrain.api.cluster import ResourcesSpec, RunPolicySpec
from difftrain.api.data import CacheSpec, StorageSpec

PROFILE_KIND = "DiffusionTrainingProfile"
PROFILE_PLURAL = "diffusiontrainingprofiles"
# The spec groups a profile may set, as they are spelled in a manifest.
PROFILE_GROUPS = ("resources", "storage", "cache", "runPolicy")
# A cluster-scoped object's name: a DNS subdomain.
PROFILE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class DiffusionTrainingProfileSpec(ApiModel):
    """The groups of a DiffusionTrainingJob's spec that a platform sets for many jobs.

    Each has the fields and rules it has in a job; what a profile leaves out, a job that
    leaves it out too gets the field's default. Secrets named here (storage.secretRef,
    storage.huggingFaceTokenSecretRef) are read from each job's own namespace.
    """

    model_config = with_rules(
        {
            "rule": "!has(self.runPolicy) || !has(self.runPolicy.suspend)",
            "message": "spec.runPolicy.suspend is each job's own switch and cannot come from "
            "a profile",
            "fieldPath": ".runPolicy.suspend",
        }
    )

    resources: ResourcesSpec | None = Field(
        None, description="Image, pods, devices and placement (spec.resources)."
    )
    storage: StorageSpec | None = Field(
        None, description="The object store and its credentials (spec.storage)."
    )
    cache: CacheSpec | None = Field(None, description="The shared cache (spec.cache).")
    run_policy: RunPolicySpec | None = Field(
        None,
        description="Restarts, deadlines, clean-up and the Kueue queue (spec.runPolicy); "
        "not suspend, which is each job's own switch.",
    )

    @model_validator(mode="after")
    def _no_suspend(self):
        if self.run_policy is not None and "suspend" in self.run_policy.model_fields_set:
            raise_problems(
                [
                    (
                        ("runPolicy", "suspend"),
                        "is each job's own switch and cannot come from a profile; remove it "
                        "(set spec.runPolicy.suspend in the job)",
                    )
                ]
            )
        return self


class ProfileMeta(BaseModel):
    """The parts of a cluster-scoped object's metadata difftrain reads."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(
        min_length=1, max_length=253, pattern=PROFILE_NAME_PATTERN, description="Profile name."
    )
    generation: int | None = Field(None, description="Set by the API server.")


class DiffusionTrainingProfile(BaseModel):
    """Platform defaults for DiffusionTrainingJobs (difftrain.io/v1alpha1), cluster-scoped."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["difftrain.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["DiffusionTrainingProfile"]
    metadata: ProfileMeta
    spec: DiffusionTrainingProfileSpec


def is_profile(data: Any) -> bool:
    """Whether a parsed YAML document is a DiffusionTrainingProfile."""
    return isinstance(data, dict) and data.get("kind") == PROFILE_KIND


def _overlay(under: dict, over: dict) -> dict:
    """``over`` laid on ``under``: objects merge key by key; any other value ``over`` sets
    (lists included) replaces ``under``'s; a null in ``over`` counts as not set."""
    merged = dict(under)
    for key, value in over.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


def merge(job: dict, profile_spec: dict) -> dict:
    """The job manifest ``job`` with its spec laid over the profile's groups (the job wins,
    field by field). Only the profile groups are merged; the job's other fields are its own."""
    spec = dict(job.get("spec") or {})
    for group in PROFILE_GROUPS:
        given = profile_spec.get(group)
        if isinstance(given, dict) and given:
            mine = spec.get(group)
            spec[group] = _overlay(given, mine if isinstance(mine, dict) else {})
    return copy.deepcopy({**job, "spec": spec})


def named(job: Any) -> str | None:
    """The profile a job manifest names in spec.profile, if any (None for anything that
    is not a manifest)."""
    spec = job.get("spec") if isinstance(job, dict) else None
    profile = spec.get("profile") if isinstance(spec, dict) else None
    return profile if isinstance(profile, str) else None


def snapshot(profile: dict) -> dict:
    """What a job's status keeps of the profile it was merged with: its name, generation
    and spec (so that the job's spec stays what it was when it started)."""
    metadata = profile.get("metadata") or {}
    found = {"name": metadata.get("name"), "spec": profile.get("spec") or {}}
    if metadata.get("generation") is not None:
        found["generation"] = metadata["generation"]
    return found
