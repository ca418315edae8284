import asyncio
import threading
import time

import kopf
import pytest_asyncio
from kmock import Server

from difftrain.operator.builders import Defaults
from difftrain.operator.handlers import configure, register
from difftrain.operator.kube import Kube, api_client
from difftrain.operator.metrics import OperatorMetrics
from difftrain.operator.reconcile import Controller
from tests.kube_emulator import ApiServer

# Long enough that tests see what events alone trigger; a test that needs the periodic
# resync (time-based transitions) asks for a short one with @pytest.mark.resync(seconds).
RESYNC_SECONDS = 3600.0


@pytest_asyncio.fixture
async def k8s():
    """The emulated API server, listening on 127.0.0.1."""
    async with ApiServer() as server, Server(server, host="127.0.0.1"):
        yield server


class Operator:
    """The real operator (Kopf, handlers, controller) in a thread of its own: Kopf cancels
    the tasks of its event loop when it stops, and the emulator must keep serving."""

    def __init__(self, url: str, resync_seconds: float = RESYNC_SECONDS, namespaces=()):
        self.url, self.resync_seconds, self.namespaces = url, resync_seconds, list(namespaces)
        self.metrics = OperatorMetrics()
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        registry, settings = kopf.OperatorRegistry(), kopf.OperatorSettings()
        configure(settings)
        settings.watching.connect_timeout = 5
        settings.networking.request_timeout = 10
        register(registry, self.resync_seconds, self.namespaces)

        @kopf.on.login(registry=registry)
        def login(**_):
            return kopf.ConnectionInfo(server=self.url, insecure=True)

        controller = Controller(Kube(api_client(self.url)), Defaults(), self.metrics)
        self._stop, ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(
            target=kopf.run,
            daemon=True,
            kwargs={
                "registry": registry,
                "settings": settings,
                "standalone": True,
                "clusterwide": not self.namespaces,
                "namespaces": self.namespaces,
                "stop_flag": self._stop,
                "ready_flag": ready,
                "memo": kopf.Memo(controller=controller),
            },
        )
        self._thread.start()
        assert await asyncio.to_thread(ready.wait, 15), "the operator did not start"

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 15)
        assert not self._thread.is_alive(), "the operator did not stop"


@pytest_asyncio.fixture
async def operator(k8s, request):
    marker = request.node.get_closest_marker("resync")
    resync = marker.args[0] if marker else RESYNC_SECONDS
    running = Operator(str(k8s.url).rstrip("/"), resync)
    await running.start()
    yield running
    if running._thread.is_alive():
        await running.stop()


async def eventually(check, timeout: float = 10.0):
    """Wait until ``check()`` returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {check.__doc__ or check}")
        await asyncio.sleep(0.05)
