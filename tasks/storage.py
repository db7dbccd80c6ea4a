"""Dataset storage chosen by URL: file:// (local folder), s3:// (prefect-aws or boto3), gs:// (prefect-gcp or google-cloud-storage).

Every write is atomic per object: a local file is written beside its target, fsynced, renamed
over it, and its folder fsynced (with every folder the write created), so a file the build
reported as written survives a power loss; an S3 or GCS object appears whole on a single PUT.
Datasets write their manifest last, so a dataset is complete exactly when its manifest exists.
A process killed mid-write leaves its hidden temporary file; the next write into that folder
removes such files once they have been untouched for STALE_TEMPORARY_SECONDS (a live writer's
own is never that old). Errors a retry would meet again (a wrong bucket or credentials, a folder
not writable or full) are StorageError naming the object; a URL carrying credentials or a query
is refused, since every manifest quotes the URL.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

from paylater.redaction import MASK, redact
from paylater.settings import Settings, get_settings

STALE_TEMPORARY_SECONDS = 24 * 3600
"""Age (since the last byte written) past which a temporary file is a dead writer's leftover.

A day, not minutes: removing a live writer's file fails its write, while a leftover only costs
disk space until the folder's next write after the bound (datasets are written daily).
"""
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")
"""The names write_file_atomically gives its temporary files, and only those."""


class StorageError(RuntimeError):
    """A storage URL that cannot be served, or an object that is missing."""


class DatasetStorage(Protocol):
    """Objects under one root, addressed by relative keys like `training/as_of=2026-11-26/part-0.parquet`."""

    url: str

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing it atomically."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """The bytes under `key` (StorageError when missing)."""
        ...

    def exists(self, key: str) -> bool:
        """Whether `key` exists."""
        ...

    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders of `prefix` (sorted)."""
        ...


def _check_key(key: str) -> str:
    """Reject keys that could escape the root."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}")
    return key


def join_uri(root: str, key: str) -> str:
    """The full URL of `key` under `root`."""
    return f"{root.rstrip('/')}/{key}"


def fsync_folder(folder: Path) -> None:
    """Make the entries of `folder` (files renamed or created in it) durable."""
    # A rename is only in the folder's own data: without this, a power loss can undo it even
    # though the renamed file's bytes were fsynced.
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders(folder: Path) -> None:
    """`mkdir -p` whose new folders survive a power loss (each one's parent fsynced)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)  # exist_ok: a concurrent writer may create it first
        fsync_folder(created.parent)


def write_file_atomically(target: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write a file whole or not at all, durably: a temporary file in the target's folder,
    flushed and fsynced, renamed over the target, then the folder fsynced."""
    make_folders(target.parent)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    # Not mkstemp: its 0600 would stay with the file after the rename, and other users of a
    # shared volume (a retrain or dashboard running as another user) could not read it.
    # 0666 less the umask, as any other file the process writes.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    remove_stale_temporaries(target.parent)
    fsync_folder(target.parent)


def remove_stale_temporaries(
    folder: Path, older_than: float = STALE_TEMPORARY_SECONDS
) -> list[Path]:
    """Delete temporary files of writes that died, untouched for `older_than` seconds; those removed.

    Best effort: a file that cannot be removed (another user's on a shared volume) is left, as
    the write that called this has succeeded.
    """
    cutoff = time.time() - older_than
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not _TEMPORARY.fullmatch(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode) or info.st_mtime > cutoff:
                    continue
                os.unlink(entry.path)
            except OSError:  # renamed by its writer meanwhile, or not ours to remove
                continue
            removed.append(Path(entry.path))
    return removed


_LOCAL_CONFIG_ERRORS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENOTDIR,
        errno.EEXIST,  # a file where a folder of the key should be
        errno.EISDIR,
        errno.ENAMETOOLONG,
    }
)
"""Errors of a local read or write that name the folder, its permissions or its disk: the same
on a retry."""


def _local_reason(exc: OSError) -> str:
    """What a failed local write ran into, naming the path (a file where a folder should be
    reads "File exists" from mkdir, which names no culprit)."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{exc.filename or 'a part of its path'} is a file, not a folder"
    return f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"


class LocalStorage:
    """A local folder (file:// URL)."""

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write the file atomically and durably (see write_file_atomically)."""
        target = self.root / _check_key(key)
        try:
            write_file_atomically(target, lambda handle: handle.write(data))
        except OSError as exc:
            if exc.errno not in _LOCAL_CONFIG_ERRORS:
                raise  # EIO, a network file system's hiccup: callers may retry
            raise StorageError(
                f"cannot write {join_uri(self.url, key)}: {_local_reason(exc)}"
                " (check that the folder is writable by this user and has free space)"
            ) from exc

    def read_bytes(self, key: str) -> bytes:
        """The file's bytes."""
        path = self.root / _check_key(key)
        if not path.is_file():
            raise StorageError(f"{join_uri(self.url, key)} does not exist")
        try:
            return path.read_bytes()
        except OSError as exc:
            if exc.errno not in _LOCAL_CONFIG_ERRORS:
                raise
            raise StorageError(
                f"cannot read {join_uri(self.url, key)}: {_local_reason(exc)}"
                " (check that this user may read the datasets folder)"
            ) from exc

    def exists(self, key: str) -> bool:
        """Whether the file exists."""
        return (self.root / _check_key(key)).is_file()

    def list_dirs(self, prefix: str) -> list[str]:
        """Sub-folder names."""
        folder = self.root / _check_key(prefix)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir())


_S3_CONFIG_ERRORS = frozenset(
    {
        "NoSuchBucket",
        "InvalidBucketName",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
    }
)
"""S3 error codes that name a wrong bucket or credentials: retrying gives the same answer."""


@contextmanager
def _s3_errors(url: str, action: str) -> Iterator[None]:
    """Turn S3's configuration errors into a StorageError naming the URL; others (throttling,
    5xx, the endpoint unreachable) propagate as they are, so callers may retry them."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise StorageError(
            f"cannot {action} {url}: {exc}; set AWS credentials in the environment or name a"
            " prefect-aws S3Bucket block in PAYLATER_DATASET_S3_BLOCK"
        ) from exc
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code not in _S3_CONFIG_ERRORS:
            raise
        raise StorageError(
            f"cannot {action} {url}: S3 answered {code}"
            f" ({error.get('Message') or 'no message'}); check the bucket and its credentials"
        ) from exc


class S3Storage:
    """An S3 bucket and prefix, through a boto3 client."""

    def __init__(self, url: str, client: Any, bucket: str, prefix: str) -> None:
        self.url = url
        self.client = client
        self.bucket = bucket
        self.prefix = prefix

    def _key(self, key: str) -> str:
        """The object key under the prefix."""
        return f"{self.prefix}{_check_key(key)}"

    def write_bytes(self, key: str, data: bytes) -> None:
        """One PUT: the object appears whole or not at all."""
        with _s3_errors(join_uri(self.url, key), "write"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def read_bytes(self, key: str) -> bytes:
        """GET the object."""
        with _s3_errors(join_uri(self.url, key), "read"):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except self.client.exceptions.NoSuchKey as exc:
                raise StorageError(f"{join_uri(self.url, key)} does not exist") from exc
            return bytes(response["Body"].read())

    def exists(self, key: str) -> bool:
        """HEAD the object."""
        with _s3_errors(join_uri(self.url, key), "look up"):
            response = self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=self._key(key), MaxKeys=1
            )
        return any(o["Key"] == self._key(key) for o in response.get("Contents", []))

    def list_dirs(self, prefix: str) -> list[str]:
        """Common prefixes one level below `prefix`."""
        base = self._key(prefix).rstrip("/") + "/"
        names: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_errors(join_uri(self.url, prefix), "list"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    names.add(common["Prefix"][len(base) :].rstrip("/"))
        return sorted(names)


@contextmanager
def _gcs_errors(url: str, action: str) -> Iterator[None]:
    """Turn Cloud Storage's answers that name a wrong bucket or credentials (404 on a write or a
    listing, 401, 403) into a StorageError naming the URL; others (429, 5xx, the endpoint
    unreachable) propagate as they are, so callers may retry them."""
    from google.api_core.exceptions import Forbidden, NotFound, Unauthorized

    try:
        yield
    except (NotFound, Forbidden, Unauthorized) as exc:
        raise StorageError(
            f"cannot {action} {url}: Cloud Storage answered {exc.code} {type(exc).__name__};"
            " check the bucket and its credentials"
        ) from exc


class GcsStorage:
    """A Cloud Storage bucket and prefix, through a google-cloud-storage Bucket."""

    def __init__(self, url: str, bucket: Any, prefix: str) -> None:
        self.url = url
        self.bucket = bucket
        self.prefix = prefix

    def _key(self, key: str) -> str:
        """The object name under the prefix."""
        return f"{self.prefix}{_check_key(key)}"

    def write_bytes(self, key: str, data: bytes) -> None:
        """One upload: the object appears whole or not at all."""
        with _gcs_errors(join_uri(self.url, key), "write"):
            self.bucket.blob(self._key(key)).upload_from_string(
                data, content_type="application/octet-stream"
            )

    def read_bytes(self, key: str) -> bytes:
        """Download the object."""
        from google.api_core.exceptions import NotFound

        with _gcs_errors(join_uri(self.url, key), "read"):
            try:
                return bytes(self.bucket.blob(self._key(key)).download_as_bytes())
            except NotFound as exc:
                # Cloud Storage answers 404 alike for a missing object and a missing bucket.
                raise StorageError(
                    f"{join_uri(self.url, key)} does not exist (or its bucket does not)"
                ) from exc

    def exists(self, key: str) -> bool:
        """Whether the object exists."""
        with _gcs_errors(join_uri(self.url, key), "look up"):
            return bool(self.bucket.blob(self._key(key)).exists())

    def list_dirs(self, prefix: str) -> list[str]:
        """Prefixes one level below `prefix`."""
        base = self._key(prefix).rstrip("/") + "/"
        with _gcs_errors(join_uri(self.url, prefix), "list"):
            blobs = self.bucket.client.list_blobs(self.bucket, prefix=base, delimiter="/")
            for _ in blobs:  # the prefixes are filled in as the pages are read
                pass
        return sorted(p[len(base) :].rstrip("/") for p in blobs.prefixes)


def _bucket_and_prefix(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix/")."""
    parsed = urlparse(url)
    if not parsed.netloc:
        raise StorageError(f"storage URL {_shown(url)!r} names no bucket")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client: from the configured prefect-aws S3Bucket block, else from the environment."""
    if settings.dataset_s3_block:
        from prefect_aws import S3Bucket

        block: Any = _load_block(S3Bucket, "PAYLATER_DATASET_S3_BLOCK", settings.dataset_s3_block)
        return block.credentials.get_s3_client()
    import boto3

    endpoint = settings.s3_endpoint_url
    if endpoint and _carries_credentials(endpoint):
        # botocore quotes its endpoint whole in every connection error.
        raise StorageError(
            f"PAYLATER_S3_ENDPOINT_URL {_shown(endpoint)!r} carries credentials or query"
            " parameters, which every connection error would quote: give scheme://host:port and"
            " the credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a Prefect block"
        )
    return boto3.client("s3", endpoint_url=endpoint)


def _load_block(block_type: Any, setting: str, name: str) -> Any:
    """Load the block `setting` names; one it names that does not exist is a StorageError.

    Prefect 3's Block.load raises ValueError ("Unable to find block document named ...") for a
    missing block: configuration, which a retry cannot mend (feature_build retries other errors).
    An unreachable Prefect API raises otherwise and stays retryable.
    """
    try:
        return block_type.load(name)
    except ValueError as exc:
        raise StorageError(
            f"{setting} {name!r} names no {block_type.__name__} block the Prefect API knows"
            f" (Prefect: {exc}): create it (prefect block create, or .save() in Python) or"
            " correct the setting"
        ) from exc


def gcs_client(settings: Settings) -> Any:
    """A google-cloud-storage client: from the configured prefect-gcp GcsBucket block, else the environment."""
    if settings.dataset_gcs_block:
        from prefect_gcp.cloud_storage import GcsBucket

        setting = "PAYLATER_DATASET_GCS_BLOCK"
        block: Any = _load_block(GcsBucket, setting, settings.dataset_gcs_block)
        return block.gcp_credentials.get_cloud_storage_client()
    from google.cloud import storage  # type: ignore[attr-defined,unused-ignore]

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # An emulator (fake-gcs-server, gcp-storage-emulator) takes no credentials.
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator"),
            credentials=AnonymousCredentials(),
        )
    return storage.Client()


def _shown(url: str) -> str:
    """`url` as errors may quote it: credentials masked, the whole query too (any of it may be one)."""
    parts = urlsplit(redact(url))
    return urlunsplit(parts._replace(query=MASK if parts.query else "", fragment=""))


def _carries_credentials(url: str) -> bool:
    """Whether `url` holds `user:password@` or a query (where a signed URL keeps its token)."""
    parts = urlsplit(url)
    return "@" in parts.netloc or bool(parts.query)


def _refuse_credentials(url: str) -> None:
    """StorageError for a URL carrying `user:password@` or a query (a signed URL's token).

    The storage's URL is quoted by every manifest, model version's lineage, flow result and
    error, so whatever it carries would be copied in clear everywhere; no backend here reads
    credentials or options from it anyway.
    """
    if _carries_credentials(url):
        raise StorageError(
            f"dataset URL {_shown(url)!r} carries credentials or query parameters, which every"
            " manifest and error would quote: give it as file:///path, s3://bucket/prefix or"
            " gs://bucket/prefix and put credentials in the environment or a Prefect block"
            " (PAYLATER_DATASET_S3_BLOCK, PAYLATER_DATASET_GCS_BLOCK)"
        )


def open_storage(url: str | None = None, settings: Settings | None = None) -> DatasetStorage:
    """Open dataset storage at `url` (default: settings.datasets)."""
    settings = settings or get_settings()
    url = url or settings.datasets
    _refuse_credentials(url)
    scheme = urlparse(url).scheme
    if scheme == "file":
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"file URL {_shown(url)!r} must be file:///absolute/path")
        return LocalStorage(url, Path(unquote(parsed.path)))
    if scheme == "s3":
        bucket, prefix = _bucket_and_prefix(url)
        return S3Storage(url, s3_client(settings), bucket, prefix)
    if scheme == "gs":
        from google.auth.exceptions import DefaultCredentialsError

        bucket_name, prefix = _bucket_and_prefix(url)
        try:
            client = gcs_client(settings)
        except DefaultCredentialsError as exc:
            raise StorageError(
                f"cannot open {url}: {exc} (set GOOGLE_APPLICATION_CREDENTIALS or name a"
                " prefect-gcp GcsBucket block in PAYLATER_DATASET_GCS_BLOCK)"
            ) from exc
        return GcsStorage(url, client.bucket(bucket_name), prefix)
    raise StorageError(
        f"dataset URL {_shown(url)!r} is of unknown kind: use file:///path, s3://bucket/prefix or gs://bucket/prefix"
    )
