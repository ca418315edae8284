"""Build the test control plane's binaries from Go modules, once per version.

kube-apiserver, kube-controller-manager and kube-scheduler come from ``k8s.io/kubernetes``
built in a small wrapper module: that module requires it and replaces each staging module
(``k8s.io/api``, ``k8s.io/client-go``, ...) with its published ``v0.X.Y`` tag, which is how
Kubernetes builds outside its own repository. etcd's server module is built through a
three-line ``main`` (its own module has replace directives, so ``go install`` refuses it),
kwok with ``go install``, Kueue in a copy of its module with one line changed (see
KUEUE_METRICS_CERTS); Kueue's CRDs and webhook configurations are copied from its module.
The wrappers are written to the cache, not the clone; the binaries land in
``CACHE/<name>-<version>/bin`` and are never rebuilt.

``python -m tests.cluster.build`` builds everything and prints where.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# One Kubernetes minor, the one that pairs with this machine's Go (1.36 with Go 1.26).
KUBERNETES = "v1.36.3"
ETCD = "v3.6.16"
KWOK = "v0.8.0"
KUEUE = "v0.17.0"
# kstatus, the status library of Flux's health checks and kubectl's: tests/cluster/kstatus.
CLI_UTILS = "v0.37.2"
# Katib: its File metrics collector's parser (tests/cluster/katib) and its API's OpenAPI.
KATIB = "v0.19.0"
# Bumped when the way Kueue is built changes, so a cached binary of the old way is not used.
KUEUE_BUILD = "b2"
# Kueue reads its metrics certificate from this fixed path when it does not manage its own
# certificates (as here: its webhooks must serve a certificate for 127.0.0.1). The build
# lets KUEUE_METRICS_CERT_DIR move it, by changing that one line in a copy of the module.
KUEUE_METRICS_CERTS = 'metricsCertPath := "/etc/kueue/metrics/certs"'

ROOT = Path(__file__).resolve().parents[2]
KSTATUS_MAIN = ROOT / "tests" / "cluster" / "kstatus" / "main.go"
KATIB_MAIN = ROOT / "tests" / "cluster" / "katib" / "main.go"
CACHE = Path(
    os.environ.get("DIFFTRAIN_CLUSTER_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "difftrain" / "cluster"
)


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Binaries:
    """Where each binary of the control plane is."""

    etcd: Path
    apiserver: Path
    controller_manager: Path
    scheduler: Path
    kwok: Path
    kueue: Path
    kueue_manifests: Path  # Kueue's CRDs (crds/) and webhook configurations (webhooks.yaml)
    kstatus: Path  # tests/cluster/kstatus/main.go: kstatus's verdict on JSON objects
    katib_metrics: Path  # tests/cluster/katib/main.go: Katib's File collector's parser
    katib_api: Path  # Katib's OpenAPI (swagger.json) and CRDs (crds/)


def binaries(build: bool = True, log=print) -> Binaries:
    """Every binary, built first where the cache lacks it; with ``build=False`` a missing
    one is an error that says how to build it (the tests do not build: it takes minutes)."""

    def cached(name, how):
        return _cached(name, how if build else None, log)

    kube = cached(f"kubernetes-{KUBERNETES}", _build_kubernetes)
    etcd = cached(f"etcd-{ETCD}", _build_etcd)
    kwok = cached(f"kwok-{KWOK}", _go_install("sigs.k8s.io/kwok/cmd/kwok", KWOK))
    kueue = cached(f"kueue-{KUEUE}-{KUEUE_BUILD}", _build_kueue)
    program = hashlib.sha256(KSTATUS_MAIN.read_bytes()).hexdigest()[:8]  # rebuilt when edited
    kstatus = cached(f"kstatus-{CLI_UTILS}-{program}", _build_kstatus)
    collector = hashlib.sha256(KATIB_MAIN.read_bytes()).hexdigest()[:8]
    katib = cached(f"katib-metrics-{KATIB}-{collector}", _build_katib_metrics)
    katib_api = _cached(f"katib-api-{KATIB}", _katib_api if build else None, log, "config")
    kueue_manifests = _cached(
        f"kueue-manifests-{KUEUE}", _kueue_manifests if build else None, log, folder="config"
    )
    return Binaries(
        etcd=etcd / "etcd",
        apiserver=kube / "kube-apiserver",
        controller_manager=kube / "kube-controller-manager",
        scheduler=kube / "kube-scheduler",
        kwok=kwok / "kwok",
        kueue=kueue / "kueue",
        kueue_manifests=kueue_manifests,
        kstatus=kstatus / "kstatus-check",
        katib_metrics=katib / "katib-metrics",
        katib_api=katib_api,
    )


def _cached(name: str, build, log, folder: str = "bin") -> Path:
    """``CACHE/name/folder``, made by ``build(folder, work folder)`` if missing. It
    appears whole or not at all: it is built beside and renamed into place."""
    final = CACHE / name
    if (final / folder).is_dir():
        return final / folder
    if build is None:
        raise BuildError(
            f"{final / folder} is missing: run `make cluster-binaries` (it builds "
            "the control plane from Go modules once, in minutes)"
        )
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=f".{name}-") as scratch:
        scratch = Path(scratch)
        (scratch / folder).mkdir()
        log(f"building {name} (once; cached in {CACHE})")
        started = time.monotonic()
        build(scratch / folder, scratch / "src")
        shutil.rmtree(scratch / "src", ignore_errors=True)
        try:
            scratch.rename(final)
        except OSError:  # another build got there first
            if not (final / folder).is_dir():
                raise
        log(f"built {name} in {time.monotonic() - started:.0f} s")
    return final / folder


def _go(*args: str, cwd: Path, env: dict | None = None) -> str:
    if shutil.which("go") is None:
        raise BuildError("the control plane is built with Go (1.26 or newer): install Go")
    result = subprocess.run(
        ["go", *args],
        cwd=cwd,
        env={**_go_env(), **(env or {})},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise BuildError(f"go {' '.join(args)} failed in {cwd}:\n{result.stderr[-4000:]}")
    return result.stdout


def _go_env() -> dict:
    # CGO off as in Kubernetes' own release builds; a machine's own GOFLAGS still apply.
    return {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": _goflags()}


def _goflags() -> str:
    flags = os.environ.get("GOFLAGS", "").split()
    return " ".join([*flags, "-buildvcs=false", "-trimpath"])


def _module(module: str, version: str) -> dict:
    """``go mod download -json`` of the module: where its source (Dir) and go.mod are."""
    return json.loads(_go("mod", "download", "-json", f"{module}@{version}", cwd=CACHE))


def _writable(folder: Path) -> None:
    """Make a copy out of Go's read-only module cache writable (and removable)."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _staging_replacements(version: str) -> dict[str, str]:
    """Each staging module that ``k8s.io/kubernetes`` replaces with a folder of its own
    repository, mapped to the tag published for it (v1.36.3 -> v0.36.3)."""
    text = Path(_module("k8s.io/kubernetes", version)["GoMod"]).read_text()
    tag = "v0." + version.removeprefix("v1.")
    found = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", text, re.MULTILINE)
    if not found:
        raise BuildError(f"k8s.io/kubernetes {version}: no staging replacements in its go.mod")
    return {module: tag for module in found}


def _build_kubernetes(bin_dir: Path, src: Path) -> None:
    src.mkdir()
    replaces = _staging_replacements(KUBERNETES)
    lines = ["module difftrain.test/kubernetes", "", "go 1.26.0", "", "replace ("]
    lines += [f"\t{module} => {module} {tag}" for module, tag in sorted(replaces.items())]
    (src / "go.mod").write_text("\n".join([*lines, ")", ""]))
    commands = [
        f"k8s.io/kubernetes/cmd/{name}"
        for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
    ]
    _go("get", *(f"{command}@{KUBERNETES}" for command in commands), cwd=src)
    _go("build", "-ldflags", _version_flags(KUBERNETES), "-o", str(bin_dir), *commands, cwd=src)


def _version_flags(version: str) -> str:
    """Stamp the version as Kubernetes' release builds do, so clients see a real one."""
    major, minor = version.removeprefix("v").split(".")[:2]
    stamps = {
        "gitVersion": version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{name}={value}" for name, value in stamps.items()]
    return " ".join(flags)


def _wrapper(name: str, main_go: str, requirement: str, binary: str):
    """A build of ``main_go`` (its text) in a module of its own that requires
    ``requirement`` (module@version), into ``binary``."""

    def build(bin_dir: Path, src: Path) -> None:
        src.mkdir()
        (src / "go.mod").write_text(f"module difftrain.test/{name}\n\ngo 1.26.0\n")
        (src / "main.go").write_text(main_go)
        _go("get", requirement, cwd=src)
        _go("mod", "tidy", cwd=src)
        _go("build", "-ldflags", "-s -w", "-o", str(bin_dir / binary), ".", cwd=src)

    return build


_build_etcd = _wrapper(
    "etcd",
    'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
    "func main() { etcdmain.Main(os.Args) }\n",
    f"go.etcd.io/etcd/server/v3@{ETCD}",
    "etcd",
)


_build_kstatus = _wrapper(
    "kstatus", KSTATUS_MAIN.read_text(), f"sigs.k8s.io/cli-utils@{CLI_UTILS}", "kstatus-check"
)
_build_katib_metrics = _wrapper(
    "katib", KATIB_MAIN.read_text(), f"github.com/kubeflow/katib@{KATIB}", "katib-metrics"
)


def _katib_api(config: Path, _src: Path) -> None:
    """Katib's v1beta1 OpenAPI (its published CRDs keep no schema) and its CRDs."""
    module = Path(_module("github.com/kubeflow/katib", KATIB)["Dir"])
    shutil.copyfile(module / "pkg" / "apis" / "v1beta1" / "swagger.json", config / "swagger.json")
    shutil.copytree(module / "manifests" / "v1beta1" / "components" / "crd", config / "crds")
    _writable(config)


def _build_kueue(bin_dir: Path, src: Path) -> None:
    """Kueue's module, copied, with KUEUE_METRICS_CERTS moved, built in place (Go takes
    no overlay of a file in its module cache)."""
    source = _module("sigs.k8s.io/kueue", KUEUE)["Dir"]
    shutil.copytree(source, src, ignore=shutil.ignore_patterns("test", "site", "*_test.go"))
    _writable(src)
    main = src / "cmd" / "kueue" / "main.go"
    text = main.read_text()
    if text.count(KUEUE_METRICS_CERTS) != 1:
        raise BuildError(f"{main}: no line `{KUEUE_METRICS_CERTS}` to point elsewhere")
    moved = KUEUE_METRICS_CERTS + (
        '\n\t\tif dir := os.Getenv("KUEUE_METRICS_CERT_DIR"); dir != "" { metricsCertPath = dir }'
    )
    main.write_text(text.replace(KUEUE_METRICS_CERTS, moved))
    _go("build", "-ldflags", "-s -w", "-o", str(bin_dir / "kueue"), "./cmd/kueue", cwd=src)


def _go_install(package: str, version: str):
    def build(bin_dir: Path, _src: Path) -> None:
        _go(
            "install",
            "-ldflags",
            "-s -w",
            f"{package}@{version}",
            cwd=CACHE,
            env={"GOBIN": str(bin_dir)},
        )

    return build


def _kueue_manifests(config: Path, _src: Path) -> None:
    """Kueue's CRDs and webhook configurations, from its module's ``config/`` (the
    release's install YAML is kustomized from these)."""
    components = Path(_module("sigs.k8s.io/kueue", KUEUE)["Dir"]) / "config" / "components"
    shutil.copytree(components / "crd" / "bases", config / "crds")
    shutil.copyfile(components / "webhook" / "manifests.yaml", config / "webhooks.yaml")
    _writable(config)


if __name__ == "__main__":
    try:
        found = binaries(log=lambda line: print(line, file=sys.stderr, flush=True))
    except BuildError as error:
        sys.exit(str(error))
    for name, path in vars(found).items():
        print(f"{name}: {path}")
