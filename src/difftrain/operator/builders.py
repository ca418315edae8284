"""Desired children of a DiffusionTrainingJob, as pure functions of (job, attempt, defaults).

For attempt N the operator wants: ConfigMap ``<job>-config`` (the trainer's job.json),
headless Service ``<job>`` (stable DNS for the rendezvous), and Indexed batch/v1 Job
``<job>-a<N>`` with one pod per node, each running ``torchrun --module difftrain.trainer``.
Nothing here reads the clock, the environment or the cluster.
"""

from dataclasses import dataclass, field
from decimal import Decimal

from difftrain import __version__, contract
from difftrain.api.cluster import GPU_RESOURCE
from difftrain.api.config import TrainerConfig
from difftrain.api.job import API_VERSION, KIND, DiffusionTrainingJob, pod_hostname
from difftrain.api.quantity import format_bytes, parse_quantity
from difftrain.api.scratch import scratch_size

CONTAINER = contract.TRAINER_CONTAINER
CONFIG_MOUNT = "/etc/difftrain"
DEFAULT_SHM = Decimal(8 * 2**30)
COMPLETION_INDEX = f"metadata.annotations['{contract.COMPLETION_INDEX}']"
RUN_AS = 1000


@dataclass(frozen=True)
class Defaults:
    """Operator-wide settings for trainer pods; a job's spec.resources overrides them
    (for requests, limits and the node selector, key by key)."""

    image: str = f"difftrain-trainer:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    requests: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    # A NetworkPolicy per job (the chart turns it on): its pods accept connections only
    # from each other, and on the metrics port from these namespaces' pods.
    network_policy: bool = False
    metrics_namespaces: tuple[str, ...] = ()
    # What a job may ask for (admission.py): images matching these shell-style patterns
    # besides ``image``, and ServiceAccounts besides the namespace's ``default``.
    allowed_images: tuple[str, ...] = ()
    allowed_service_accounts: tuple[str, ...] = ()
    # Where jobs that name no spec.cache.uri keep their cached latents and text
    # embeddings (s3:// or file://); each node's own disk when empty.
    cache_uri: str = ""


def config_map_name(name: str) -> str:
    return f"{name}-config"


def job_name(name: str, attempt: int) -> str:
    return f"{name}-a{attempt}"


def labels(job: DiffusionTrainingJob) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "difftrain",
        "app.kubernetes.io/instance": job.metadata.name,
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/part-of": "difftrain",
        "app.kubernetes.io/managed-by": "difftrain-operator",
        contract.JOB_NAME_LABEL: job.metadata.name,
    }


def _metadata(job: DiffusionTrainingJob, name: str, extra_labels: dict | None = None) -> dict:
    return {
        "name": name,
        "namespace": job.metadata.namespace or "default",
        "labels": {**labels(job), **(extra_labels or {})},
    }


def owned(manifest: dict, job: DiffusionTrainingJob) -> dict:
    """``manifest`` with ``job`` (as the API server knows it, uid and all) as its
    controller: what the operator applies. The builders leave it out, so that what
    ``difftrain render`` prints is what they build."""
    reference = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    metadata = {**manifest["metadata"], "ownerReferences": [reference]}
    return {**manifest, "metadata": metadata}


def config_map(job: DiffusionTrainingJob, attempt: int) -> dict:
    """The trainer's only input: the validated spec and the job's identity."""
    config = TrainerConfig(
        name=job.metadata.name,
        namespace=job.metadata.namespace or "default",
        uid=job.metadata.uid or "",
        attempt=attempt,
        spec=job.spec,
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.metadata.name)),
        "data": {"job.json": config.to_json()},
    }


def service(job: DiffusionTrainingJob) -> dict:
    """Headless Service giving every pod the DNS name ``<hostname>.<job>``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, job.metadata.name),
        "spec": {
            "clusterIP": "None",
            # The rendezvous must resolve before pods are Ready (they never are, otherwise).
            "publishNotReadyAddresses": True,
            "selector": {contract.JOB_NAME_LABEL: job.metadata.name},
            "ports": [
                {
                    "name": "rendezvous",
                    "port": contract.RENDEZVOUS_PORT,
                    "targetPort": contract.RENDEZVOUS_PORT,
                },
                {
                    "name": "metrics",
                    "port": contract.METRICS_PORT,
                    "targetPort": contract.METRICS_PORT,
                },
            ],
        },
    }


def _env(job: DiffusionTrainingJob, attempt: int, image: str, cache_uri: str = "") -> list[dict]:
    spec = job.spec
    name = job.metadata.name
    env = [
        {"name": "PET_NNODES", "value": str(spec.resources.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(max(1, spec.resources.gpus_per_node))},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "PET_MASTER_ADDR", "value": f"{pod_hostname(name, attempt, 0)}.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(contract.RENDEZVOUS_PORT)},
        {"name": "DIFFTRAIN_CONFIG", "value": f"{CONFIG_MOUNT}/job.json"},
        {"name": "DIFFTRAIN_SCRATCH", "value": "/scratch"},
        {"name": "DIFFTRAIN_CACHE", "value": "/cache"},
        {"name": "DIFFTRAIN_IMAGE", "value": image},
        # The launcher gives torchrun's agent this long (less a margin) to stop the workers.
        {
            "name": "DIFFTRAIN_GRACE_SECONDS",
            "value": str(spec.run_policy.termination_grace_period_seconds),
        },
        {"name": "HOME", "value": "/scratch/home"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "AWS_REGION", "value": spec.storage.region},
    ]
    if cache_uri and not spec.cache.uri:  # the job's own wins (the trainer reads it first)
        env.append({"name": "DIFFTRAIN_SHARED_CACHE_URI", "value": cache_uri})
    if spec.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint})
    secret = spec.storage.secret_ref
    if secret:
        keys = [
            ("AWS_ACCESS_KEY_ID", secret.access_key_id_key, False),
            ("AWS_SECRET_ACCESS_KEY", secret.secret_access_key_key, False),
        ]
        if secret.session_token_key:
            keys.append(("AWS_SESSION_TOKEN", secret.session_token_key, False))
        env += [
            {
                "name": variable,
                "valueFrom": {
                    "secretKeyRef": {"name": secret.name, "key": key, "optional": optional}
                },
            }
            for variable, key, optional in keys
        ]
    token = spec.storage.hugging_face_token_secret_ref
    if token:
        reference = {"name": token.name, "key": token.key, "optional": False}
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": reference}})
    registry = spec.output.registry
    if registry and registry.mlflow.secret_ref:
        env += [
            {
                "name": variable,
                "valueFrom": {
                    "secretKeyRef": {
                        "name": registry.mlflow.secret_ref,
                        "key": variable,
                        "optional": True,
                    }
                },
            }
            for variable in contract.MLFLOW_CREDENTIALS
        ]
    return env


def _resources(job: DiffusionTrainingJob, defaults: Defaults) -> dict:
    resources = job.spec.resources
    requests = {**defaults.requests, **resources.requests}
    limits = {**defaults.limits, **resources.limits}
    if resources.gpus_per_node:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = resources.gpus_per_node
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def shared_memory(job: DiffusionTrainingJob, defaults: Defaults | None = None) -> str:
    """Size of /dev/shm: the spec's, else half the memory limit, else 8Gi."""
    resources = job.spec.resources
    if resources.shared_memory is not None:
        return str(resources.shared_memory)
    memory = _resources(job, defaults or Defaults()).get("limits", {}).get("memory")
    return format_bytes(parse_quantity(memory) / 2 if memory is not None else DEFAULT_SHM)


def _pod_spec(job: DiffusionTrainingJob, attempt: int, defaults: Defaults) -> dict:
    resources = job.spec.resources
    image = resources.image or defaults.image
    container = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": resources.image_pull_policy or defaults.image_pull_policy,
        # torchrun --module difftrain.trainer, keeping the trainer's exit code (launch.py).
        # Prompts, URIs and names reach the trainer only through the config file: no shell.
        "command": ["python", "-m", "difftrain.launch"],
        "env": _env(job, attempt, image, defaults.cache_uri),
        "ports": [
            {"name": "metrics", "containerPort": contract.METRICS_PORT},
            {"name": "rendezvous", "containerPort": contract.RENDEZVOUS_PORT},
        ],
        "resources": _resources(job, defaults),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
            *(
                {"name": f"claim-{v.name}", "mountPath": v.mount_path, "readOnly": v.read_only}
                for v in resources.volumes
            ),
        ],
        "terminationMessagePolicy": "File",
    }
    pod = {
        "restartPolicy": "Never",
        "subdomain": job.metadata.name,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": job.spec.run_policy.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            *(
                {
                    "name": f"claim-{v.name}",
                    "persistentVolumeClaim": {"claimName": v.claim_name, "readOnly": v.read_only},
                }
                for v in resources.volumes
            ),
            {"name": "config", "configMap": {"name": config_map_name(job.metadata.name)}},
            {
                "name": "shm",
                "emptyDir": {"medium": "Memory", "sizeLimit": shared_memory(job, defaults)},
            },
            {"name": "scratch", "emptyDir": {"sizeLimit": scratch_size(job.spec)}},
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    optional = {
        "serviceAccountName": resources.service_account_name,
        "priorityClassName": resources.priority_class_name,
        "nodeSelector": {**defaults.node_selector, **(resources.node_selector or {})},
        "tolerations": [
            t.model_dump(by_alias=True, exclude_none=True) for t in resources.tolerations
        ],
    }
    pod.update({key: value for key, value in optional.items() if value})
    return pod


def network_policy(job: DiffusionTrainingJob, defaults: Defaults) -> dict:
    """Ingress to the job's pods: from each other on every port (the rendezvous on 29500,
    and the collectives' own ports), and on the metrics port from the operator's and the
    monitoring namespaces. Nothing else reaches them."""
    own = {"matchLabels": {contract.JOB_NAME_LABEL: job.metadata.name}}
    rules = [{"from": [{"podSelector": own}]}]
    if defaults.metrics_namespaces:
        rules.append(
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": namespace}
                        }
                    }
                    for namespace in defaults.metrics_namespaces
                ],
                "ports": [{"protocol": "TCP", "port": contract.METRICS_PORT}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(job, job.metadata.name),
        "spec": {"podSelector": own, "policyTypes": ["Ingress"], "ingress": rules},
    }


def initially_suspended(job: DiffusionTrainingJob) -> bool:
    """A new attempt's Job starts suspended when the user suspended the job, or when Kueue
    must admit it first (Kueue then unsuspends it)."""
    policy = job.spec.run_policy
    return policy.suspend or policy.queue_name is not None


def trainer_job(job: DiffusionTrainingJob, attempt: int, defaults: Defaults) -> dict:
    """The Indexed Job running attempt ``attempt`` of the gang."""
    policy = job.spec.run_policy
    nodes = job.spec.resources.nodes
    attempt_labels = {contract.ATTEMPT_LABEL: str(attempt)}
    metadata = _metadata(job, job_name(job.metadata.name, attempt), attempt_labels)
    if policy.queue_name:
        metadata["labels"][contract.QUEUE_LABEL] = policy.queue_name
    spec = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,  # one failed pod breaks the gang; the operator restarts it whole
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": sorted(contract.PERMANENT_EXIT_CODES),
                    },
                },
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        },
        "suspend": initially_suspended(job),
        "template": {
            "metadata": {"labels": {**labels(job), **attempt_labels}},
            "spec": _pod_spec(job, attempt, defaults),
        },
    }
    if policy.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def children(job: DiffusionTrainingJob, attempt: int, defaults: Defaults) -> list[dict]:
    """Everything attempt ``attempt`` needs, in the order to create it."""
    policy = [network_policy(job, defaults)] if defaults.network_policy else []
    return [config_map(job, attempt), service(job), *policy, trainer_job(job, attempt, defaults)]
