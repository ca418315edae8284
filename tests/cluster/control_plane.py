"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver (TLS, a static
admin token, service-account keys, RBAC), kube-controller-manager (the Job, garbage
collector, TTL, namespace and service-account controllers), kube-scheduler and kwok, whose
fake nodes run the pods through the stages in ``stages.yaml``.

The tests start one per session (``tests/cluster/conftest.py``); ``make cluster`` starts
one for a person (``python -m tests.cluster up``).
"""

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from difftrain.local import free_port
from tests.cluster.build import ROOT, Binaries

STAGES = Path(__file__).with_name("stages.yaml")
CRDS = ROOT / "crds"
ADMIN_TOKEN = "difftrain-test-admin"
SERVICE_CIDR = "10.96.0.0/16"
# What the fake nodes have: enough for the tests' jobs, GPUs included.
NODE_CAPACITY = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"}
KWOK_NODE_LABEL = "difftrain.test/kwok"
CONTROLLERS = [
    "job-controller",
    "garbage-collector-controller",
    "ttl-after-finished-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    "pod-garbage-collector-controller",
    "node-lifecycle-controller",  # lifts the not-ready taint once kwok says Ready
    "deployment-controller",  # the chart's operator Deployment
    "replicaset-controller",
    "resourcequota-controller",  # a namespace's quota, as the tests exhaust it
]


class ControlPlaneError(RuntimeError):
    pass


@dataclass
class ControlPlane:
    folder: Path
    binaries: Binaries
    nodes: int = 2
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.folder / "kubeconfig"

    @property
    def ca(self) -> Path:
        return self.folder / "pki" / "ca.crt"

    @property
    def container_log(self) -> Path:
        """What every pod's trainer container has logged, for ``kubectl logs``: kwok serves
        this file as each of them (:meth:`log` appends to it, for ``-f``)."""
        return self.folder / "logs" / "trainer.log"

    def log(self, *lines: str) -> None:
        """Log ``lines`` from every trainer container, in the CRI log format kubelets
        keep (what kwok reads)."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with self.container_log.open("a") as file:
            file.writelines(f"{now} stdout F {line}\n" for line in lines)

    @property
    def audit_log(self) -> Path:
        """What every service account asked of the API server, one JSON event a line."""
        return self.folder / "logs" / "audit.log"

    def start(self, timeout: float = 120) -> "ControlPlane":
        self.folder.mkdir(parents=True, exist_ok=True)
        logs = self.folder / "logs"
        logs.mkdir(exist_ok=True)
        pki = _write_pki(self.folder / "pki")
        etcd_port, peer_port, self.port = free_port(), free_port(), free_port()
        kubelet_port = free_port()  # kwok's kubelet API, for every fake node
        self.container_log.touch()
        self.url = f"https://127.0.0.1:{self.port}"
        (self.folder / "tokens.csv").write_text(f"{ADMIN_TOKEN},admin,admin,system:masters\n")
        self._write_kubeconfig()
        try:
            self._start(
                "etcd",
                [
                    self.binaries.etcd,
                    "--name=test",
                    f"--data-dir={self.folder / 'etcd'}",
                    f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-cluster=test=http://127.0.0.1:{peer_port}",
                    "--unsafe-no-fsync",
                    "--log-level=warn",
                ],
            )
            self._start(
                "kube-apiserver",
                [
                    self.binaries.apiserver,
                    f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={self.port}",
                    f"--cert-dir={self.folder / 'apiserver'}",
                    f"--tls-cert-file={pki['serving.crt']}",
                    f"--tls-private-key-file={pki['serving.key']}",
                    f"--client-ca-file={pki['ca.crt']}",
                    f"--token-auth-file={self.folder / 'tokens.csv'}",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-account-key-file={pki['sa.pub']}",
                    f"--service-account-signing-key-file={pki['sa.key']}",
                    "--authorization-mode=RBAC",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    # As OpenShift runs it: blockOwnerDeletion needs update on the owner's
                    # finalizers subresource.
                    "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                    "--allow-privileged=true",
                    "--profiling=false",
                    f"--audit-policy-file={self._write_audit_policy()}",
                    f"--audit-log-path={self.audit_log}",
                    "--audit-log-format=json",
                    # Logs and the like come from kwok's kubelet API, on 127.0.0.1 (the
                    # nodes' InternalIP), serving a certificate of the test CA.
                    "--kubelet-preferred-address-types=InternalIP",
                    f"--kubelet-certificate-authority={pki['ca.crt']}",
                ],
            )
            self._wait_ready(timeout)
            self._start(
                "kube-controller-manager",
                [
                    self.binaries.controller_manager,
                    f"--kubeconfig={self.kubeconfig}",
                    "--leader-elect=false",
                    "--secure-port=0",
                    f"--controllers={','.join(CONTROLLERS)}",
                    f"--root-ca-file={pki['ca.crt']}",
                    f"--service-account-private-key-file={pki['sa.key']}",
                    "--use-service-account-credentials=false",
                ],
            )
            self._start(
                "kube-scheduler",
                [
                    self.binaries.scheduler,
                    f"--kubeconfig={self.kubeconfig}",
                    "--leader-elect=false",
                    "--secure-port=0",
                ],
            )
            self._start(
                "kwok",
                [
                    self.binaries.kwok,
                    f"--kubeconfig={self.kubeconfig}",
                    "--manage-all-nodes=false",
                    f"--manage-nodes-with-label-selector={KWOK_NODE_LABEL}=true",
                    f"--config={STAGES}",
                    f"--config={self._write_logs_config()}",
                    f"--server-address=127.0.0.1:{kubelet_port}",
                    "--node-ip=127.0.0.1",
                    f"--node-port={kubelet_port}",
                    f"--tls-cert-file={pki['serving.crt']}",
                    f"--tls-private-key-file={pki['serving.key']}",
                ],
            )
            for index in range(self.nodes):
                self.apply(fake_node(f"kwok-node-{index}"))
        except BaseException:
            self.stop()
            raise
        return self

    def _write_logs_config(self) -> Path:
        """kwok's ClusterLogs: every pod's trainer container logs ``container_log``."""
        path = self.folder / "kwok-logs.yaml"
        logs = {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "ClusterLogs",
            "metadata": {"name": "trainer"},
            "spec": {
                "logs": [
                    {
                        "containers": ["trainer"],
                        "logsFile": str(self.container_log),
                        "follow": True,
                    }
                ]
            },
        }
        path.write_text(yaml.safe_dump(logs))
        return path

    def stop(self) -> None:
        """Stop every process, the last started first."""
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()

    def kubectl(self, *args: str, input: str | None = None, check: bool = True):
        """Run kubectl against this control plane; the CompletedProcess."""
        result = subprocess.run(
            [kubectl_binary(), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)}: {result.stderr}")
        return result

    def api(self, method: str, path: str, body=None, content_type="application/json"):
        """One request as the admin: the decoded JSON answer, or None for 404."""
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {ADMIN_TOKEN}",
                "Content-Type": content_type,
                "Accept": "application/json",
            },
        )
        if not hasattr(self, "_tls"):
            self._tls = ssl.create_default_context(cafile=str(self.ca))
        try:
            with urllib.request.urlopen(request, context=self._tls, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise ControlPlaneError(f"{method} {path}: {error.code} {error.read()!r}") from None

    def install_crds(self) -> None:
        """difftrain's CRD, as a platform team installs it, once it is Established."""
        self.kubectl("apply", "--server-side", "-f", str(CRDS))
        self._wait_established(["diffusiontrainingjobs.difftrain.io"])

    def _wait_established(self, names: list[str], timeout: float = 60) -> None:
        """Wait until these CRDs are Established. Polled here: `kubectl wait` fails at
        once on a CRD whose status has no conditions yet."""
        path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"

        def established() -> bool:
            for name in names:
                conditions = (self.api("GET", path + name) or {}).get("status", {})
                if not any(
                    c["type"] == "Established" and c["status"] == "True"
                    for c in conditions.get("conditions") or []
                ):
                    return False
            return True

        self._wait_for(established, "the CRDs to be Established", timeout)

    def apply(self, *objects: dict) -> None:
        text = yaml.safe_dump_all(list(objects))
        self.kubectl("apply", "--server-side", "-f", "-", input=text)

    def _start(self, name: str, command: list, env: dict | None = None) -> None:
        log = (self.folder / "logs" / f"{name}.log").open("w")
        with log:
            self.processes[name] = subprocess.Popen(
                [str(part) for part in command],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **env} if env else None,
            )
        time.sleep(0.2)
        self.check_alive()

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.folder / "logs" / f"{name}.log").read_text()[-3000:]
                raise ControlPlaneError(f"{name} exited with {process.returncode}:\n{tail}")

    def _wait_ready(self, timeout: float) -> None:
        context = ssl.create_default_context(cafile=str(self.ca))
        request = urllib.request.Request(
            f"{self.url}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        self._wait_for(lambda: fetch(request, context) is not None, "the API server", timeout)

    def _wait_for(self, ready, what: str, timeout: float) -> None:
        """Poll ``ready()`` until it is true, failing at once if a process exited."""
        deadline = time.monotonic() + timeout
        while not ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{what} was not ready in {timeout:.0f} s")
            time.sleep(0.3)

    def _write_kubeconfig(self) -> None:
        self.write_kubeconfig(self.kubeconfig, "admin", ADMIN_TOKEN)

    def write_kubeconfig(self, path: Path, user: str, token: str) -> Path:
        """A kubeconfig at ``path`` for this API server, as ``user`` with ``token``."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(
                            self.ca.read_bytes()
                        ).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    def _write_audit_policy(self) -> Path:
        # Service accounts only (the operator runs as one); the controllers and the tests
        # use the admin token and stay out of the log.
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [
                {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                {"level": "None"},
            ],
        }
        path = self.folder / "audit-policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        return path

    def audit_events(self, user: str) -> list[dict]:
        """The audit log's events for ``user``, one per request (a watch logs when its
        response starts and again when it ends)."""
        events = {}
        with contextlib.suppress(FileNotFoundError), self.audit_log.open() as log:
            for line in log:
                event = json.loads(line)
                if event.get("user", {}).get("username") == user:
                    events.setdefault(event["auditID"], event)
        return list(events.values())

    def start_kueue(self, timeout: float = 60) -> None:
        """Kueue's controller manager with its CRDs and its webhooks (Jobs and Kueue's
        own objects) called by the API server at 127.0.0.1; once per control plane."""
        if "kueue" in self.processes:
            return
        manifests = self.binaries.kueue_manifests
        self.kubectl("apply", "--server-side", "-f", str(manifests / "crds"))
        self._wait_established(
            [
                ".".join(reversed(p.stem.split("_", 1)))
                for p in sorted((manifests / "crds").glob("*.yaml"))
            ]
        )
        certs = self.folder / "kueue" / "certs"
        serving_certificate(self.folder / "pki", "kueue-webhooks", certs)
        webhook_port, health_port = free_port(), free_port()
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["batch/job"]},
        }
        path = self.folder / "kueue" / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        self._start(
            "kueue",
            [
                self.binaries.kueue,
                f"--config={path}",
                f"--kubeconfig={self.kubeconfig}",
                "--feature-gates=VisibilityOnDemand=false",
            ],
            env={"KUEUE_METRICS_CERT_DIR": str(certs)},
        )
        readyz = f"http://127.0.0.1:{health_port}/readyz"
        self._wait_for(lambda: fetch(readyz) is not None, "Kueue", timeout)
        self.apply(*kueue_webhooks(manifests / "webhooks.yaml", webhook_port, self.ca))


def fetch(url, context: ssl.SSLContext | None = None) -> str | None:
    """The body at ``url`` (a URL or a Request), or None when it cannot be had (refused,
    not answering, an error status)."""
    try:
        with urllib.request.urlopen(url, context=context, timeout=5) as response:
            return response.read().decode()
    except OSError:  # URLError and HTTPError are OSErrors
        return None


# Kueue's webhooks the tests need: batch Jobs and Kueue's own objects.
KUEUE_WEBHOOK_PATHS = ("-batch-v1-job", "-kueue-x-k8s-io-")


def kueue_webhooks(manifests: Path, port: int, ca: Path) -> list[dict]:
    """Kueue's webhook configurations, pointed at its server on 127.0.0.1 (the API server
    has no route to a Service here), for the webhooks in KUEUE_WEBHOOK_PATHS."""
    bundle = base64.b64encode(ca.read_bytes()).decode()
    configurations = []
    for configuration in yaml.safe_load_all(manifests.read_text()):
        kept = []
        for webhook in configuration["webhooks"]:
            path = webhook["clientConfig"]["service"]["path"]
            if any(part in path for part in KUEUE_WEBHOOK_PATHS):
                webhook["clientConfig"] = {
                    "url": f"https://127.0.0.1:{port}{path}",
                    "caBundle": bundle,
                }
                kept.append(webhook)
        name = "kueue-" + configuration["metadata"]["name"]
        configurations.append({**configuration, "metadata": {"name": name}, "webhooks": kept})
    return configurations


def fake_node(name: str) -> dict:
    """A node that kwok runs: its pods never start a container."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                KWOK_NODE_LABEL: "true",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
        },
        "status": {"capacity": NODE_CAPACITY, "allocatable": NODE_CAPACITY},
    }


def kubectl_binary() -> str:
    """kubectl from the virtual environment (``make``'s ``.venv/bin/kubectl``), else PATH."""
    local = ROOT / ".venv" / "bin" / "kubectl"
    if local.exists():
        return str(local)
    found = shutil.which("kubectl")
    if found is None:
        raise ControlPlaneError("no kubectl: run `make .venv/bin/kubectl`")
    return found


def _write_pki(folder: Path) -> dict[str, Path]:
    """A CA, the API server's serving certificate (127.0.0.1, localhost and the in-cluster
    names) and the service-account signing key pair; made once per folder."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    paths = {
        name: folder / name
        for name in ("ca.crt", "ca.key", "serving.crt", "serving.key", "sa.key", "sa.pub")
    }
    if all(path.exists() for path in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _certificate("difftrain-test-ca", None)
    paths["ca.crt"].write_bytes(_pem(ca))
    _write_key(paths["ca.key"], ca_key)
    names = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    addresses = ["127.0.0.1", str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))]
    serving, serving_key = _certificate("kube-apiserver", (ca, ca_key), names, addresses)
    paths["serving.crt"].write_bytes(_pem(serving))
    _write_key(paths["serving.key"], serving_key)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(paths["sa.key"], sa_key)
    paths["sa.pub"].write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return paths


def serving_certificate(pki: Path, name: str, folder: Path) -> tuple[Path, Path]:
    """``folder/tls.crt`` and ``tls.key``: a certificate for 127.0.0.1 signed by the test
    CA in ``pki`` (for a webhook server the API server calls)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    certificate, key = _certificate(name, (ca, ca_key), ["localhost"], ["127.0.0.1"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tls.crt").write_bytes(_pem(certificate))
    _write_key(folder / "tls.key", key)
    return folder / "tls.crt", folder / "tls.key"


def _certificate(subject: str, issuer, names=(), addresses=()):
    """(certificate, key): a CA's own when ``issuer`` is None, else a serving certificate
    for ``names`` and ``addresses`` signed by ``issuer`` (certificate, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = (
        (subject, key)
        if issuer is None
        else (issuer[0].subject.rfc4514_string().removeprefix("CN="), issuer[1])
    )
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
    else:
        alternative = [
            *map(x509.DNSName, names),
            *(x509.IPAddress(ipaddress.ip_address(a)) for a in addresses),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative), False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _pem(certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return certificate.public_bytes(serialization.Encoding.PEM)


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
