"""``difftrain operator``: run the operator (one replica; see docs/operator.md)."""

import logging
import os

import kopf
from prometheus_client import start_http_server

from difftrain.operator.builders import Defaults
from difftrain.operator.handlers import configure, register
from difftrain.operator.kube import Kube, api_client
from difftrain.operator.metrics import OperatorMetrics
from difftrain.operator.reconcile import Controller


def defaults_from_env() -> Defaults:
    """Trainer pod defaults from the operator's environment (set by the Helm chart)."""
    values = {
        "image": os.environ.get("DIFFTRAIN_TRAINER_IMAGE"),
        "image_pull_policy": os.environ.get("DIFFTRAIN_TRAINER_IMAGE_PULL_POLICY"),
    }
    return Defaults(**{key: value for key, value in values.items() if value})


def run(namespaces: list[str], resync_seconds: float, metrics_port: int, health_port: int) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    registry, settings = kopf.OperatorRegistry(), kopf.OperatorSettings()
    configure(settings)
    register(registry, resync_seconds, namespaces)
    kopf.on.login(registry=registry)(kopf.login_via_client)
    metrics = OperatorMetrics()
    start_http_server(metrics_port, registry=metrics.registry)
    controller = Controller(Kube(api_client()), defaults_from_env(), metrics)
    kopf.run(
        registry=registry,
        settings=settings,
        standalone=True,  # one replica (Recreate strategy): no peering objects needed
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
        memo=kopf.Memo(controller=controller),
    )
