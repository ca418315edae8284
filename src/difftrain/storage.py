"""Object storage behind dataset, model and output URIs: ``s3://`` and ``file://``.

A :class:`Store` is rooted at a URI and speaks in ``/``-separated keys below it. Writes
never leave a partial object that looks complete: local files are written beside their
target and renamed into place, and S3 objects (multipart or not) only appear once whole.
Errors become :class:`~difftrain.errors.StorageAccessDenied` (exit 4, permanent: bad
credentials, no permission, no such bucket) or
:class:`~difftrain.errors.StorageUnavailable` (retryable); messages name the bucket and
operation, never a secret.
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from difftrain import bars
from difftrain.errors import (
    DifftrainError,
    InvalidSpec,
    StorageAccessDenied,
    StorageUnavailable,
)


class Conflict(Exception):
    """A conditional write found the object not as expected (present, changed or gone)."""


PARALLEL_TRANSFERS = 8
# Tries of each S3 request (adaptive back-off between them); AWS_MAX_ATTEMPTS changes it.
MAX_ATTEMPTS = 8
MULTIPART_BYTES = 64 * 1024 * 1024
LIST_PAGE_SIZE = 1000
EXAMPLES_IN_ERRORS = 3  # keys named in an error about many


@dataclass(frozen=True)
class S3Settings:
    """How to reach the object store (from ``spec.storage``); credentials come from the
    environment (``AWS_ACCESS_KEY_ID``...) or the pod's identity, never from here."""

    endpoint: str | None = None
    region: str = "us-east-1"
    path_style: bool = False

    @classmethod
    def from_spec(cls, storage) -> "S3Settings":
        return cls(storage.endpoint, storage.region, storage.path_style)


def open_store(uri: str, settings: S3Settings | None = None) -> "Store":
    """The store rooted at ``uri`` (``s3://bucket/prefix`` or ``file://path``)."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        return S3Store(bucket, prefix.strip("/"), settings or S3Settings())
    if uri.startswith("file://"):
        return FileStore(Path(uri[len("file://") :]))
    raise ValueError(f"not a storage URI: {uri!r} (expected s3:// or file://)")


class Store(ABC):
    """Objects under one root URI."""

    uri: str

    @abstractmethod
    def child(self, prefix: str) -> "Store":
        """The store rooted at ``prefix`` below this one."""

    @abstractmethod
    def tags(self, prefix: str = "") -> dict[str, str]:
        """Every key below the folder ``prefix`` (recursively), sorted, with its object's
        tag (an ETag in S3), which every write changes."""

    def keys(self, prefix: str = "") -> list[str]:
        """Every key below the folder ``prefix`` (recursively), sorted."""
        return list(self.tags(prefix))

    @abstractmethod
    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Every key below the folder ``prefix`` (recursively), sorted, with its size."""

    def fingerprint(self, prefix: str = "", select: Callable[[str], bool] | None = None) -> str:
        """A digest of the keys below ``prefix`` (those ``select`` accepts) and their
        tags: it changes when any of those objects is written, added or removed."""
        digest = hashlib.sha256()
        for key, tag in self.tags(prefix).items():
            if select is None or select(key):
                digest.update(f"{key}\0{tag}\n".encode())
        return digest.hexdigest()[:16]

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object ``key`` exists."""

    @abstractmethod
    def download(self, key: str, path: Path, progress: Callable[[int], None] | None = None):
        """Copy object ``key`` to the local file ``path``; FileNotFoundError if absent."""

    @abstractmethod
    def upload(self, path: Path, key: str) -> None:
        """Copy the local file ``path`` to object ``key``."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The content of object ``key``; FileNotFoundError if absent."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write object ``key``."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Delete the objects ``keys`` (missing ones are fine)."""

    @abstractmethod
    def read_tagged(self, key: str) -> tuple[bytes, str]:
        """The content of object ``key`` and its tag, which every write changes;
        FileNotFoundError if absent."""

    @abstractmethod
    def write_if(self, key: str, data: bytes, tag: str | None) -> str:
        """Write object ``key`` only if it is absent (``tag`` None) or still carries
        ``tag``; the new tag. :class:`Conflict` if not."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise StorageAccessDenied now if writes here would fail; leaves nothing behind."""

    def download_tree(
        self,
        prefix: str,
        destination: Path,
        select: Callable[[str], bool] | None = None,
        *,
        unsafe_error: type[DifftrainError],
    ) -> list[Path]:
        """Copy every object under ``prefix`` (or those ``select`` accepts) into
        ``destination``, in parallel. Folder markers (keys ending in ``/``) are skipped.
        A key that would be written outside ``destination`` (a ``..`` part, a leading
        ``/``) is refused with ``unsafe_error`` before anything is copied: the caller
        knows whose input it is (a dataset's, a model's)."""
        base, root = prefix.strip("/"), destination.resolve()
        jobs, sizes = [], self.sizes(prefix)
        for key in sizes:
            relative = key[len(base) + 1 :] if base else key  # keeps a leading "/" it had
            if relative == "" or relative.endswith("/"):  # a folder marker
                continue
            if select is not None and not select(key):
                continue
            why = _why_outside(root, relative)
            if why:
                raise unsafe_error(
                    f"{self.uri}: the object {key!r} would be written outside the folder it "
                    f"is copied into ({why}); rename or delete it"
                )
            jobs.append((key, destination / relative))
        total = sum(sizes[key] for key, _ in jobs)
        what = f"{_join(self.uri, prefix)} ({len(jobs)} files)"
        with bars.bar(total, what, "B") as shown:
            _parallel(lambda key, path: self.download(key, path, shown.update), jobs)
        return [target for _, target in jobs]

    def upload_tree(self, source: Path, prefix: str) -> list[str]:
        """Copy every file under the local folder ``source`` below ``prefix``, in parallel."""
        files = sorted(p for p in source.rglob("*") if p.is_file())
        keys = [_join(prefix, p.relative_to(source).as_posix()) for p in files]
        _parallel(self.upload, list(zip(files, keys, strict=True)))
        return keys

    def delete_tree(self, prefix: str) -> None:
        """Delete every object under ``prefix``."""
        self.delete(self.keys(prefix))


def _max_attempts() -> int:
    value = os.environ.get("AWS_MAX_ATTEMPTS", str(MAX_ATTEMPTS))
    if not value.isdigit() or int(value) < 1:
        raise InvalidSpec(f"AWS_MAX_ATTEMPTS must be a whole number of at least 1, not {value!r}")
    return int(value)


def _why_outside(root: Path, relative: str) -> str | None:
    """Why the key ``relative`` would be written outside the resolved folder ``root``, or
    None. S3 keys are plain strings: ``a/../../x`` and ``/x`` are valid names there."""
    if relative.startswith("/"):
        return "its key starts with '/'"
    if ".." in relative.split("/"):
        return "its key has a '..' part"
    if not (root / relative).resolve().is_relative_to(root):
        return "a link on the way leads out of it"
    return None


def _join(*parts: str) -> str:
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


def _parallel(transfer, jobs: list[tuple]) -> None:
    if len(jobs) <= 1:
        for job in jobs:
            transfer(*job)
        return
    with ThreadPoolExecutor(PARALLEL_TRANSFERS) as pool:
        for future in [pool.submit(transfer, *job) for job in jobs]:
            future.result()


class FileStore(Store):
    """A local (or mounted) folder."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = f"file://{root}"

    def child(self, prefix: str) -> "FileStore":
        return FileStore(self.root / prefix.strip("/"))

    def _path(self, key: str) -> Path:
        return self.root / key.strip("/")

    def check_writable(self) -> None:
        existing = next(p for p in (self.root, *self.root.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise StorageAccessDenied(
                f"cannot write {self.uri}: {existing} is not a writable folder"
            )

    def _stats(self, prefix: str) -> dict[str, os.stat_result]:
        """Every file below the folder ``prefix`` by key, sorted, with its stat."""
        base = self._path(prefix)
        if not base.is_dir():
            return {}
        files = sorted(
            (p.relative_to(self.root).as_posix(), p)
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )
        return {key: path.stat() for key, path in files}

    def tags(self, prefix: str = "") -> dict[str, str]:
        return {key: _file_tag(stat) for key, stat in self._stats(prefix).items()}

    def sizes(self, prefix: str = "") -> dict[str, int]:
        return {key: stat.st_size for key, stat in self._stats(prefix).items()}

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def download(self, key: str, path: Path, progress: Callable[[int], None] | None = None):
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(f"{self.uri}/{key} does not exist")
        with _atomic_target(path) as temporary:
            shutil.copyfile(source, temporary)
        if progress is not None:
            progress(path.stat().st_size)

    def upload(self, path: Path, key: str) -> None:
        with self._writing(key) as temporary:
            shutil.copyfile(path, temporary)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"{self.uri}/{key} does not exist") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._writing(key) as temporary:
            temporary.write_bytes(data)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            for parent in path.parents:  # drop folders left empty, like S3 "folders" go
                if parent == self.root or not parent.is_relative_to(self.root):
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)
        try:
            with path.open("rb") as handle:
                return handle.read(), _file_tag(os.fstat(handle.fileno()))
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"{self.uri}/{key} does not exist") from None

    def write_if(self, key: str, data: bytes, tag: str | None) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A lock on the folder makes the check and the write one step for every writer
        # on this machine (or on a file system with working flock).
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            try:
                current = _file_tag(path.stat())
            except FileNotFoundError:
                current = None
            if current != tag:
                raise Conflict(f"{self.uri}/{key} is not as expected")
            self.write_bytes(key, data)
            return _file_tag(path.stat())
        finally:
            os.close(folder)  # releases the lock

    @contextlib.contextmanager
    def _writing(self, key: str) -> Iterator[Path]:
        try:
            with _atomic_target(self._path(key)) as temporary:
                yield temporary
        except OSError as error:  # permissions, a read-only or full disk, a file in the way
            raise StorageAccessDenied(
                f"cannot write {self.uri}/{key}: {error.strerror or error}"
            ) from None


def _file_tag(stat: os.stat_result) -> str:
    # Every write replaces the file (a new inode), so the inode alone tells writes apart.
    return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces it only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# S3 error codes that retrying will not fix.
_DENIED = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AccountProblem",
}


def delete_error(bucket: str, failures: list[dict], total: int) -> DifftrainError:
    """The error for the ``failures`` (DeleteObjects' ``Errors``) among ``total`` keys:
    :class:`StorageAccessDenied` if any was denied, else :class:`StorageUnavailable`."""
    denied = [failure for failure in failures if failure.get("Code") in _DENIED]
    shown = denied or failures
    names = [f"s3://{bucket}/{failure['Key']}" for failure in shown[:EXAMPLES_IN_ERRORS]]
    where = ", ".join(names + ["..."] * (len(shown) > EXAMPLES_IN_ERRORS))
    summary = f"delete {where}: {len(failures)} of {total} objects not deleted"
    code = shown[0].get("Code", "")
    if denied:
        return StorageAccessDenied(
            f"{summary}, access denied ({code}); check the credentials "
            "(spec.storage.secretRef) and the bucket's policy"
        )
    return StorageUnavailable(f"{summary} ({code})")


class S3Store(Store):
    """A prefix in an S3 bucket (AWS or any S3-compatible store)."""

    def __init__(self, bucket: str, prefix: str, settings: S3Settings):
        self.bucket, self.prefix, self.settings = bucket, prefix, settings
        self.uri = f"s3://{bucket}/{prefix}".rstrip("/")
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.settings.endpoint,
                region_name=self.settings.region,
                config=Config(
                    retries={"mode": "adaptive", "max_attempts": _max_attempts()},
                    s3={"addressing_style": "path" if self.settings.path_style else "auto"},
                    connect_timeout=10,
                    read_timeout=120,
                    max_pool_connections=2 * PARALLEL_TRANSFERS,
                ),
            )
        return self._client

    def child(self, prefix: str) -> "S3Store":
        store = S3Store(self.bucket, _join(self.prefix, prefix), self.settings)
        store._client = self._client
        return store

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def check_writable(self) -> None:
        probe = ".difftrain-write-check"
        self.write_bytes(probe, b"")
        self.delete([probe])

    def _listing(self, prefix: str, field: str) -> dict:
        """Every key below the folder ``prefix``, sorted, with its listing's ``field``."""
        full = self._key(prefix)
        query = full + "/" if full else ""  # "a/b" must not match "a/bc"
        keys = []
        with self._errors("list", query):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=query, PaginationConfig={"PageSize": LIST_PAGE_SIZE}
            )
            for page in pages:
                keys += [(item["Key"], item[field]) for item in page.get("Contents", [])]
        start = len(self.prefix) + 1 if self.prefix else 0
        return {key[start:]: value for key, value in sorted(keys)}

    def tags(self, prefix: str = "") -> dict[str, str]:
        return self._listing(prefix, "ETag")

    def sizes(self, prefix: str = "") -> dict[str, int]:
        return self._listing(prefix, "Size")

    def exists(self, key: str) -> bool:
        if not self._key(key):
            return False
        try:
            with self._errors("head", self._key(key)):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except FileNotFoundError:
            return False

    def download(self, key: str, path: Path, progress: Callable[[int], None] | None = None):
        with self._errors("download", self._key(key)), _atomic_target(path) as temporary:
            self.client.download_file(
                self.bucket,
                self._key(key),
                str(temporary),
                Config=self._transfer_config(),
                Callback=progress,
            )

    def upload(self, path: Path, key: str) -> None:
        with self._errors("upload", self._key(key)):
            self.client.upload_file(
                str(path), self.bucket, self._key(key), Config=self._transfer_config()
            )

    def read_bytes(self, key: str) -> bytes:
        with self._errors("read", self._key(key)):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors("write", self._key(key)):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def delete(self, keys: list[str]) -> None:
        failures = []
        for start in range(0, len(keys), 1000):  # the DeleteObjects limit
            batch = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            with self._errors("delete", batch[0]["Key"]):
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            # S3 answers 200 and lists the keys it did not delete (a policy's Deny, a
            # throttled key) in the body.
            failures += response.get("Errors", [])
        if failures:
            raise delete_error(self.bucket, failures, len(keys))

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        with self._errors("read", self._key(key)):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), response["ETag"]

    def write_if(self, key: str, data: bytes, tag: str | None) -> str:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        try:
            with self._errors("write", self._key(key)):
                try:
                    response = self.client.put_object(
                        Bucket=self.bucket, Key=self._key(key), Body=data, **condition
                    )
                except ClientError as error:
                    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if status in (409, 412):  # ConditionalRequestConflict, PreconditionFailed
                        raise Conflict(f"{self.uri}/{key} is not as expected") from None
                    raise
        except FileNotFoundError:  # If-Match on an object that has gone
            raise Conflict(f"{self.uri}/{key} is gone") from None
        return response["ETag"]

    @staticmethod
    def _transfer_config():
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_BYTES,
            multipart_chunksize=max(MULTIPART_BYTES, 5 * 1024 * 1024),  # S3's smallest part
            max_concurrency=4,
        )

    @contextlib.contextmanager
    def _errors(self, operation: str, key: str) -> Iterator[None]:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        where = f"s3://{self.bucket}/{key}"
        try:
            yield
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{where} does not exist") from None
            if code == "NoSuchBucket":
                raise StorageAccessDenied(
                    f"{operation} {where}: bucket '{self.bucket}' does not exist"
                ) from None
            if code in _DENIED or status == 403:
                raise StorageAccessDenied(
                    f"{operation} {where}: access denied ({code or status}); check the "
                    "credentials (spec.storage.secretRef) and the bucket's policy"
                ) from None
            raise StorageUnavailable(f"{operation} {where} failed: {code} {status}") from None
        except S3UploadFailedError as error:
            if "AccessDenied" in str(error) or "InvalidAccessKeyId" in str(error):
                raise StorageAccessDenied(f"{operation} {where}: access denied") from None
            if "NoSuchBucket" in str(error):
                raise StorageAccessDenied(
                    f"{operation} {where}: bucket '{self.bucket}' does not exist"
                ) from None
            raise StorageUnavailable(f"{operation} {where} failed: {error}") from None
        except NoCredentialsError:
            raise StorageAccessDenied(
                f"{operation} {where}: no S3 credentials; set spec.storage.secretRef (or give "
                "the pod an identity with access)"
            ) from None
        except EndpointConnectionError:
            endpoint = self.settings.endpoint or "the AWS endpoint"
            raise StorageUnavailable(
                f"{operation} {where}: cannot reach {endpoint}; check spec.storage.endpoint"
            ) from None
        except BotoCoreError as error:
            raise StorageUnavailable(f"{operation} {where} failed: {error}") from None
