"""Every pod the operator creates meets the restricted Pod Security Standard, checked
against the standard's rules (baseline and restricted profiles, as the pod-security
admission controller applies them to a pod spec)."""

import copy

import pytest

from difftrain.api.validation import load_job
from difftrain.operator.builders import Defaults, children
from tests.operator.test_builders import CASES

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def violations(pod: dict, annotations: dict | None = None) -> list[str]:
    """The restricted profile's rules that ``pod`` (a PodSpec) breaks, one line each."""
    found = []
    pod_context = pod.get("securityContext") or {}
    containers = [
        c
        for key in ("initContainers", "containers", "ephemeralContainers")
        for c in pod.get(key) or []
    ]
    contexts = [(f"container {c['name']}", c.get("securityContext") or {}) for c in containers]
    everything = [("pod", pod_context), *contexts]

    # Baseline.
    for where, context in everything:
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}: hostProcess")
        selinux = context.get("seLinuxOptions") or {}
        if (
            selinux.get("type", "") not in SELINUX_TYPES
            or selinux.get("user")
            or selinux.get("role")
        ):
            found.append(f"{where}: seLinuxOptions")
        if (context.get("appArmorProfile") or {}).get("type") == "Unconfined":
            found.append(f"{where}: appArmorProfile Unconfined")
        if (context.get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"{where}: seccompProfile Unconfined")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"pod: {key}")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            found.append(f"annotation {key}")
    for sysctl in pod_context.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"pod: sysctl {sysctl['name']}")
    for container in containers:
        name, context = container["name"], container.get("securityContext") or {}
        if context.get("privileged"):
            found.append(f"container {name}: privileged")
        if context.get("procMount", "Default") != "Default":
            found.append(f"container {name}: procMount")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            found.append(f"container {name}: hostPort")
        added = set((context.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            found.append(f"container {name}: adds {sorted(added - BASELINE_CAPABILITIES)}")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:  # baseline
            found.append(f"volume {volume['name']}: hostPath")
        elif not kinds <= RESTRICTED_VOLUMES:  # restricted
            found.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")

    # Restricted.
    pod_non_root = pod_context.get("runAsNonRoot") is True
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    if pod_context.get("runAsUser") == 0:
        found.append("pod: runAsUser 0")
    for container in containers:
        name, context = container["name"], container.get("securityContext") or {}
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"container {name}: allowPrivilegeEscalation not false")
        non_root = context.get("runAsNonRoot")
        if non_root is False or not (pod_non_root or non_root is True):
            found.append(f"container {name}: runAsNonRoot not true")
        if context.get("runAsUser") == 0:
            found.append(f"container {name}: runAsUser 0")
        seccomp = (context.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"container {name}: seccompProfile not RuntimeDefault or Localhost")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"container {name}: does not drop ALL capabilities")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"container {name}: adds more than NET_BIND_SERVICE")
    return found


def _pod_templates(manifest: dict) -> list[tuple[dict, dict]]:
    """(pod spec, pod annotations) of every workload the operator renders for ``manifest``."""
    found = []
    for child in children(load_job(manifest), attempt=1, defaults=Defaults()):
        if child["kind"] == "Job":
            template = child["spec"]["template"]
            found.append((template["spec"], template["metadata"].get("annotations")))
    return found


@pytest.mark.parametrize("case", CASES)
def test_every_pod_the_operator_creates_is_restricted(case):
    pods = _pod_templates(CASES[case])

    assert pods  # the trainer Job's pods
    for pod, annotations in pods:
        assert violations(pod, annotations) == []


def _trainer_pod() -> dict:
    return _pod_templates(CASES["two-nodes-eight-gpus"])[0][0]


def _set(path: str, value):
    def change(pod: dict) -> None:
        *parents, last = path.split(".")
        node = pod
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[int(last) if last.isdigit() else last] = value

    return change


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_set("hostNetwork", True), "pod: hostNetwork"),
        (_set("containers.0.securityContext.privileged", True), "privileged"),
        (
            _set("containers.0.securityContext.allowPrivilegeEscalation", True),
            "allowPrivilegeEscalation not false",
        ),
        (
            _set("containers.0.securityContext.capabilities", {"add": ["SYS_ADMIN"]}),
            "does not drop ALL capabilities",
        ),
        (
            _set("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["CHOWN"]}),
            "adds more than NET_BIND_SERVICE",
        ),
        (_set("containers.0.securityContext.runAsNonRoot", False), "runAsNonRoot not true"),
        (_set("securityContext.runAsUser", 0), "pod: runAsUser 0"),
        (_set("securityContext.seccompProfile", {"type": "Unconfined"}), "seccompProfile"),
        (_set("containers.0.ports.0.hostPort", 9400), "hostPort"),
        (_set("volumes.0", {"name": "host", "hostPath": {"path": "/"}}), "volume host: hostPath"),
        (
            _set("volumes.0", {"name": "nfs", "nfs": {"server": "x", "path": "/"}}),
            "volume nfs: ['nfs']",
        ),
        (
            _set("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
            "sysctl kernel.msgmax",
        ),
    ],
)
def test_the_check_catches_each_kind_of_violation(change, expected):
    pod = copy.deepcopy(_trainer_pod())
    change(pod)

    found = violations(pod)

    assert any(expected in line for line in found), found
