"""``difftrain operator``: run the operator (one replica; see docs/operator.md)."""

import json
import logging
import os
from datetime import timedelta

import kopf
from prometheus_client import start_http_server

from difftrain.operator.builders import Defaults
from difftrain.operator.handlers import configure, register
from difftrain.operator.kube import Kube, api_client
from difftrain.operator.metrics import OperatorMetrics
from difftrain.operator.reconcile import Controller

# The operator's defaults for trainer pods (the Helm chart sets them): variable, field,
# and whether the value is a JSON object of strings.
DEFAULTS_ENV = (
    ("DIFFTRAIN_TRAINER_IMAGE", "image", False),
    ("DIFFTRAIN_TRAINER_IMAGE_PULL_POLICY", "image_pull_policy", False),
    ("DIFFTRAIN_TRAINER_REQUESTS", "requests", True),
    ("DIFFTRAIN_TRAINER_LIMITS", "limits", True),
    ("DIFFTRAIN_TRAINER_NODE_SELECTOR", "node_selector", True),
    ("DIFFTRAIN_TRAINER_CACHE_URI", "cache_uri", False),
)


def defaults_from_env(environ=os.environ) -> Defaults:
    """Trainer pod defaults from the operator's environment; a malformed value is an error
    naming its variable."""
    values = {}
    for variable, name, is_map in DEFAULTS_ENV:
        text = environ.get(variable)
        if not text:
            continue
        if not is_map:
            values[name] = text
            continue
        try:
            value = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{variable}: not JSON ({error}): {text!r}") from None
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ValueError(f"{variable}: must be a JSON object of strings, got {text!r}")
        values[name] = value
    if values.get("cache_uri"):
        from difftrain.api.uris import check_uri

        try:
            check_uri(values["cache_uri"], ("s3", "file"))
        except ValueError as error:
            raise ValueError(f"DIFFTRAIN_TRAINER_CACHE_URI: {error}") from None
    policy = environ.get("DIFFTRAIN_NETWORK_POLICY", "false")
    if policy not in ("true", "false"):
        raise ValueError(f"DIFFTRAIN_NETWORK_POLICY: must be true or false, got {policy!r}")
    values["network_policy"] = policy == "true"
    for variable, name in (
        ("DIFFTRAIN_METRICS_NAMESPACES", "metrics_namespaces"),
        ("DIFFTRAIN_ALLOWED_IMAGES", "allowed_images"),
        ("DIFFTRAIN_ALLOWED_SERVICE_ACCOUNTS", "allowed_service_accounts"),
    ):  # comma-separated lists
        text = environ.get(variable, "")
        values[name] = tuple(item.strip() for item in text.split(",") if item.strip())
    return Defaults(**values)


def run(
    namespaces: list[str],
    resync_seconds: float,
    metrics_port: int,
    health_port: int,
    defaults: Defaults,
    failure_grace_seconds: float = 300.0,
) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    client = api_client()  # before anything starts: NoCredentials says what is missing
    registry, settings = kopf.OperatorRegistry(), kopf.OperatorSettings()
    configure(settings)
    register(registry, resync_seconds, namespaces)
    kopf.on.login(registry=registry)(kopf.login_via_client)
    metrics = OperatorMetrics()
    start_http_server(metrics_port, registry=metrics.registry)
    grace = timedelta(seconds=failure_grace_seconds)
    controller = Controller(Kube(client), defaults, metrics, grace=grace, namespaces=namespaces)
    kopf.run(
        registry=registry,
        settings=settings,
        standalone=True,  # one replica (Recreate strategy): no peering objects needed
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
        memo=kopf.Memo(controller=controller),
    )
