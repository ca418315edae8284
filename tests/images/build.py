"""Build the Dockerfile's two images with buildah, for the image tests (``make images``).

There is no Docker engine here: Debian's buildah builds the Dockerfile as it is (vfs
storage, chroot isolation), and Debian's podman runs the results. The base images the
Dockerfile names (``PYTHON_IMAGE``, ``CUDA_IMAGE``) are replaced through their build args
by one local Debian bookworm image made with debootstrap: python3 with a virtual
environment at /opt/venv on the PATH (where the operator stage's ``pip`` installs), and
the CA certificates this machine trusts (its TLS-intercepting proxy, where it has one). The
trainer's torch comes from pip's own index (the CUDA build, which runs on CPUs); users keep
the Dockerfile's default, PyTorch's CUDA index.

Everything is cached outside the clone: the base's root filesystem as a tar, keyed by its
packages and the trusted certificates; the images in buildah's store (``localhost/...``),
each keyed by the Dockerfile, the wheel's sources, the base and the build args (a stamp in
the cache says which key the image there was built from).

``python -m tests.images.build`` builds what is missing and prints what it did.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(
    os.environ.get("DIFFTRAIN_IMAGE_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "difftrain" / "images"
)
STORE = ("--storage-driver", "vfs")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "ca-certificates")
CERTIFICATES = Path("/etc/ssl/certs/ca-certificates.crt")
BASE = "localhost/difftrain-base"
IMAGES = {
    "operator": "localhost/difftrain-operator:dev",
    "trainer": "localhost/difftrain-trainer:dev",
}
# What goes into the wheel (the Dockerfile's `wheel` stage copies these).
WHEEL_SOURCES = ("pyproject.toml", "README.md", "src")


class BuildError(RuntimeError):
    pass


def _run(*command: str, log: Path | None = None) -> str:
    if log is None:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"{' '.join(command)}: {done.stderr.strip()[-3000:]}")
        return done.stdout
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(command)} failed; its output: {log}")
    return ""


def buildah(*args: str, log: Path | None = None) -> str:
    return _run("buildah", *STORE, *args, log=log)


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def exists(image: str) -> bool:
    return bool(buildah("images", "--quiet", "--filter", f"reference={image}").strip())


def base_image(log=print) -> str:
    """The Debian base, made with debootstrap once per key and imported into the store."""
    certificates = CERTIFICATES.read_bytes() if CERTIFICATES.exists() else b""
    key = _digest(SUITE.encode(), MIRROR.encode(), " ".join(PACKAGES).encode(), certificates)
    image = f"{BASE}:{key}"
    if exists(image):
        return image
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f"base-{key}.tar"
    if not archive.exists():
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=CACHE) as work:
            rootfs = Path(work) / "rootfs"
            _run(
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(rootfs),
                MIRROR,
                log=CACHE / "debootstrap.log",
            )
            _run("chroot", str(rootfs), "/usr/bin/python3", "-m", "venv", "/opt/venv")
            if certificates:
                (rootfs / "etc/ssl/certs/ca-certificates.crt").write_bytes(certificates)
            # pip in the image reads the system's certificates, not its own copy.
            (rootfs / "etc/pip.conf").write_text(
                "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
            )
            for cached in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (rootfs / cached).glob("*"):
                    if path.is_file():
                        path.unlink()
            partial = archive.with_suffix(".partial")
            _run("tar", "-C", str(rootfs), "-cf", str(partial), ".")
            partial.rename(archive)
        log(f"debootstrap {SUITE}: {time.monotonic() - started:.0f} s")
    container = buildah("from", "scratch").strip()
    try:
        buildah("add", container, str(archive), "/")
        path = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        buildah("config", "--env", f"PATH={path}", "--cmd", "/bin/bash", container)
        buildah("commit", "--quiet", container, image)
    finally:
        buildah("rm", container)
    return image


def _package_index() -> str:
    """pip's index (its configured one, else its default): the trainer's torch comes from
    there, not from the Dockerfile's default CUDA index."""
    configured = os.environ.get("PIP_INDEX_URL")
    if configured:
        return configured
    from pip._internal.models.index import PyPI

    return PyPI.simple_url


def _sources_digest() -> bytes:
    digest = hashlib.sha256()
    for name in WHEEL_SOURCES:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" in relative or ".egg-info" in relative:
                continue
            digest.update(relative.encode() + b"\0" + file.read_bytes())
    return digest.digest()


def build(target: str, base: str, log=print) -> str:
    """``target``'s image, built unless the store holds it for the same key."""
    image = IMAGES[target]
    args = {"PYTHON_IMAGE": base, "CUDA_IMAGE": base}
    if target == "trainer":
        args["TORCH_INDEX"] = _package_index()
    key = _digest(
        (ROOT / "Dockerfile").read_bytes(),
        _sources_digest(),
        target.encode(),
        repr(sorted(args.items())).encode(),
    )
    stamp = CACHE / f"{target}.key"
    if exists(image) and stamp.exists() and stamp.read_text() == key:
        return image
    started = time.monotonic()
    flags = [item for name, value in args.items() for item in ("--build-arg", f"{name}={value}")]
    buildah(
        "bud",
        "--isolation",
        "chroot",
        "--target",
        target,
        *flags,
        "--tag",
        image,
        str(ROOT),
        log=CACHE / f"{target}-build.log",
    )
    stamp.write_text(key)
    buildah("rmi", "--prune")  # the image this one replaced, untagged now
    log(f"built {image} in {time.monotonic() - started:.0f} s ({size(image)})")
    return image


def size(image: str) -> str:
    return buildah("images", "--format", "{{.Size}}", image).strip()


def images(log=print) -> dict[str, str]:
    """Both images, by target."""
    for tool in ("buildah", "podman", "debootstrap", "runc"):
        if shutil.which(tool) is None:
            raise BuildError(
                f"no {tool}: `make images` installs Debian's buildah, podman, debootstrap and runc"
            )
    base = base_image(log)
    return {target: build(target, base, log) for target in IMAGES}


if __name__ == "__main__":
    try:
        for target, image in images().items():
            print(f"{target}: {image} ({size(image)})")
    except BuildError as error:
        print(error, file=sys.stderr)
        sys.exit(1)
