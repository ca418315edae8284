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

    def start(self, timeout: float = 120) -> "ControlPlane":
        self.folder.mkdir(parents=True, exist_ok=True)
        logs = self.folder / "logs"
        logs.mkdir(exist_ok=True)
        pki = _write_pki(self.folder / "pki")
        etcd_port, peer_port, self.port = free_port(), free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        (self.folder / "tokens.csv").write_text(f"{ADMIN_TOKEN},admin,admin,system:masters\n")
        self._write_kubeconfig()
        try:
            self._start("etcd", [
                self.binaries.etcd, "--name=test", f"--data-dir={self.folder / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=test=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync", "--log-level=warn",
            ])  # fmt: skip
            self._start("kube-apiserver", [
                self.binaries.apiserver, f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}", f"--cert-dir={self.folder / 'apiserver'}",
                f"--tls-cert-file={pki['serving.crt']}",
                f"--tls-private-key-file={pki['serving.key']}",
                f"--client-ca-file={pki['ca.crt']}",
                f"--token-auth-file={self.folder / 'tokens.csv'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki['sa.pub']}",
                f"--service-account-signing-key-file={pki['sa.key']}",
                "--authorization-mode=RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true", "--profiling=false",
            ])  # fmt: skip
            self._wait_ready(timeout)
            self._start("kube-controller-manager", [
                self.binaries.controller_manager, f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false", "--secure-port=0",
                f"--controllers={','.join(CONTROLLERS)}",
                f"--root-ca-file={pki['ca.crt']}",
                f"--service-account-private-key-file={pki['sa.key']}",
                "--use-service-account-credentials=false",
            ])  # fmt: skip
            self._start("kube-scheduler", [
                self.binaries.scheduler, f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false", "--secure-port=0",
            ])  # fmt: skip
            self._start("kwok", [
                self.binaries.kwok, f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-label-selector={KWOK_NODE_LABEL}=true",
                f"--config={STAGES}", "--server-address=",
            ])  # fmt: skip
            for index in range(self.nodes):
                self.apply(fake_node(f"kwok-node-{index}"))
        except BaseException:
            self.stop()
            raise
        return self

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
            input=input, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)}: {result.stderr}")
        return result

    def install_crds(self) -> None:
        """difftrain's CRD, as a platform team installs it, once it is Established."""
        self.kubectl("apply", "--server-side", "-f", str(CRDS))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                     "crd/diffusiontrainingjobs.difftrain.io")  # fmt: skip

    def apply(self, *objects: dict) -> None:
        text = yaml.safe_dump_all(list(objects))
        self.kubectl("apply", "--server-side", "-f", "-", input=text)

    def _start(self, name: str, command: list) -> None:
        log = (self.folder / "logs" / f"{name}.log").open("w")
        with log:
            self.processes[name] = subprocess.Popen(
                [str(part) for part in command], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
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
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(request, context=context, timeout=5) as response,
            ):
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"the API server was not ready in {timeout:.0f} s")
            time.sleep(0.3)

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url,
                "certificate-authority-data": base64.b64encode(self.ca.read_bytes()).decode(),
            }}],
            "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
            "current-context": "test",
        }  # fmt: skip
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig.chmod(0o600)


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
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    paths = {name: folder / name for name in
             ("ca.crt", "ca.key", "serving.crt", "serving.key", "sa.key", "sa.pub")}  # fmt: skip
    if all(path.exists() for path in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject, key, issuer, issuer_key, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())  # fmt: skip

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("difftrain-test-ca", ca_key, "difftrain-test-ca", ca_key, [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                       content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, encipher_only=False,
                       decipher_only=False), True),
    ])  # fmt: skip
    names = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local"]  # fmt: skip
    addresses = [
        ipaddress.ip_address("127.0.0.1"),
        next(ipaddress.ip_network(SERVICE_CIDR).hosts()),
    ]
    serving_key = ec.generate_private_key(ec.SECP256R1())
    serving = certificate("kube-apiserver", serving_key, "difftrain-test-ca", ca_key, [
        (x509.SubjectAlternativeName([*map(x509.DNSName, names),
                                      *map(x509.IPAddress, addresses)]), False),
        (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False),
    ])  # fmt: skip
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    paths["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["ca.key"].write_bytes(pem_key(ca_key))
    paths["serving.crt"].write_bytes(serving.public_bytes(serialization.Encoding.PEM))
    paths["serving.key"].write_bytes(pem_key(serving_key))
    paths["sa.key"].write_bytes(pem_key(sa_key))
    paths["sa.pub"].write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    for name in ("ca.key", "serving.key", "sa.key"):
        os.chmod(paths[name], 0o600)
    return paths
