"""Dataset storage by URL: a local folder, S3 on a real moto server, GCS on gcp-storage-emulator."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr

from paylater.settings import Settings
from paylater.testing import listen_port
from tasks import storage
from tasks.storage import DatasetStorage, StorageError, open_storage


def exercise(store: DatasetStorage) -> None:
    """The contract every backend keeps: write, replace, read, exists, list sub-folders."""
    key = "training/as_of=2026-07-01/part-0.parquet"
    assert not store.exists(key)
    store.write_bytes(key, b"first")
    store.write_bytes(key, b"second")
    store.write_bytes("training/as_of=2026-07-02/manifest.json", b"{}")
    assert store.read_bytes(key) == b"second"
    assert store.exists(key)
    assert store.list_dirs("training") == ["as_of=2026-07-01", "as_of=2026-07-02"]
    assert store.list_dirs("scoring") == []
    with pytest.raises(StorageError, match="does not exist"):
        store.read_bytes("training/as_of=2026-07-03/manifest.json")
    with pytest.raises(StorageError, match="invalid storage key"):
        store.write_bytes("../escape", b"x")


def test_local_folder(tmp_path: Path, paylater_home: Path) -> None:
    store = open_storage((tmp_path / "datasets").as_uri())
    exercise(store)
    # Atomic replace leaves no temporary files behind.
    assert sorted(p.name for p in (tmp_path / "datasets/training/as_of=2026-07-01").iterdir()) == [
        "part-0.parquet"
    ]


def test_default_url_is_under_home(paylater_home: Path) -> None:
    store = open_storage()
    assert isinstance(store, storage.LocalStorage)
    assert store.root == paylater_home.resolve() / "datasets"


def test_unknown_scheme_is_one_clear_error(paylater_home: Path) -> None:
    with pytest.raises(StorageError, match="unknown kind"):
        open_storage("ftp://host/x")
    with pytest.raises(StorageError, match="names no bucket"):
        open_storage("s3:///prefix")


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """A real moto S3 server on a free loopback port, for the module: each test uses buckets of
    its own, and stopping a server costs up to 0.5 s (its serve_forever's poll)."""
    from moto.server import ThreadedMotoServer

    port = listen_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def moto_endpoint(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The moto S3 server, with dummy credentials in the environment."""
    for name, value in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ]:
        monkeypatch.setenv(name, value)
    return moto_server


def test_s3_from_environment(
    moto_endpoint: str, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="risk-data")
    monkeypatch.setenv("PAYLATER_S3_ENDPOINT_URL", moto_endpoint)
    store = open_storage("s3://risk-data/paylater/v1")
    exercise(store)
    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(Bucket="risk-data")[
            "Contents"
        ]
    ]
    assert "paylater/v1/training/as_of=2026-07-01/part-0.parquet" in keys


def test_s3_through_prefect_aws_block(
    moto_endpoint: str, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a block name configured, credentials and endpoint come from the S3Bucket block."""
    import boto3
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="blocked")
    block = S3Bucket(
        bucket_name="blocked",
        credentials=AwsCredentials(
            aws_access_key_id="testing",
            aws_secret_access_key=SecretStr("testing"),
            region_name="us-east-1",
            aws_client_parameters=AwsClientParameters(endpoint_url=moto_endpoint),
        ),
    )
    monkeypatch.setattr(S3Bucket, "load", classmethod(lambda cls, name: block))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # the block, not the environment, must be used
    monkeypatch.setenv("PAYLATER_DATASET_S3_BLOCK", "datasets")
    store = open_storage("s3://blocked/ds", Settings())
    exercise(store)


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[str]:
    """gcp-storage-emulator in memory on a free loopback port, for the module (as moto_server)."""
    from gcp_storage_emulator.server import create_server

    port = listen_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="risk-gcs")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def gcs_emulator(gcs_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The emulator, reached via STORAGE_EMULATOR_HOST."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    return gcs_server


def test_gcs_against_emulator(gcs_emulator: str, paylater_home: Path) -> None:
    store = open_storage("gs://risk-gcs/paylater")
    exercise(store)
    import google.cloud.storage as gcs

    assert isinstance(store, storage.GcsStorage)
    client: gcs.Client = store.bucket.client
    names = [b.name for b in client.list_blobs("risk-gcs")]
    assert "paylater/training/as_of=2026-07-01/part-0.parquet" in names


def test_a_missing_gcs_bucket_is_a_storage_error_naming_it(
    gcs_emulator: str, paylater_home: Path
) -> None:
    # Cloud Storage's 404 on an upload or a listing names no bucket, and feature_build would
    # retry it as an I/O hiccup.
    store = open_storage("gs://no-such-bucket/paylater")
    key = "training/as_of=2026-07-01/manifest.json"
    where = "gs://no-such-bucket/paylater/training"
    for call in (lambda: store.write_bytes(key, b"{}"), lambda: store.list_dirs("training")):
        with pytest.raises(StorageError, match=f"{where}.*Cloud Storage answered 404"):
            call()
    with pytest.raises(StorageError, match=f"{where}.*does not exist"):
        store.read_bytes(key)
    assert not store.exists(key)


def test_a_missing_bucket_is_a_storage_error_naming_it(
    moto_endpoint: str, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mistyped bucket fails the same way every time: feature_build must not retry it as an
    # I/O hiccup, and the error must say which bucket (boto3's message names none).
    monkeypatch.setenv("PAYLATER_S3_ENDPOINT_URL", moto_endpoint)
    store = open_storage("s3://no-such-bucket/paylater")
    key = "training/as_of=2026-07-01/manifest.json"
    where = "s3://no-such-bucket/paylater/training"
    for call in (
        lambda: store.write_bytes(key, b"{}"),
        lambda: store.read_bytes(key),
        lambda: store.exists(key),
        lambda: store.list_dirs("training"),
    ):
        with pytest.raises(StorageError, match=f"{where}.*S3 answered NoSuchBucket"):
            call()
    # Loading a dataset of a given day says the bucket is the problem, not the dataset.
    from datetime import date

    from tasks.datasets import DatasetError, load_training_dataset

    monkeypatch.setenv("PAYLATER_DATASET_URL", "s3://no-such-bucket/paylater")
    with pytest.raises(DatasetError, match=r"no-such-bucket.*S3 answered NoSuchBucket"):
        load_training_dataset(date(2026, 7, 1))


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_local_files_get_the_permissions_the_umask_gives(
    tmp_path: Path, paylater_home: Path, umask: int, mode: int
) -> None:
    # Datasets were written 0600 whatever the umask (a temporary file's mode, kept by the
    # rename), in folders of 0755: a retrain, dashboard or worker running as another user of a
    # shared volume could list them but not read them.
    import os
    import stat

    previous = os.umask(umask)
    try:
        store = open_storage((tmp_path / "datasets").as_uri())
        store.write_bytes("training/as_of=2026-07-01/manifest.json", b"{}")
    finally:
        os.umask(previous)
    written = tmp_path / "datasets/training/as_of=2026-07-01/manifest.json"
    assert stat.S_IMODE(written.stat().st_mode) == mode


def test_a_local_write_fsyncs_the_folders_its_rename_and_mkdirs_changed(
    tmp_path: Path, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file was fsynced and renamed into place but its folder never was: after a power loss
    # a dataset the build reported as written could miss its directory entry (and a new
    # as_of folder its own entry in the kind's folder).
    import os
    import stat

    root = tmp_path / "datasets"
    (root / "training").mkdir(parents=True)
    key = "training/as_of=2026-07-01/manifest.json"
    target = root / key
    synced: list[tuple[Path, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            # What the folder holds at the moment it is synced: the rename must come first.
            folder = Path(os.readlink(f"/proc/self/fd/{fd}"))
            synced.append((folder, target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    open_storage(root.as_uri()).write_bytes(key, b"{}")
    assert (target.parent, True) in synced  # the new entry, after the rename
    assert (root / "training", False) in synced  # the new as_of folder's entry, before it
    assert target.read_bytes() == b"{}"
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]


def test_a_failed_local_write_leaves_the_previous_file_and_no_temporary(
    tmp_path: Path, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    store = open_storage((tmp_path / "datasets").as_uri())
    key = "training/as_of=2026-07-01/manifest.json"
    store.write_bytes(key, b"first")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match=r"manifest\.json: No space left"):
        store.write_bytes(key, b"second")
    monkeypatch.undo()
    assert store.read_bytes(key) == b"first"
    assert [p.name for p in (tmp_path / "datasets/training/as_of=2026-07-01").iterdir()] == [
        "manifest.json"
    ]


_KILLED_WRITE = """
import os, signal, sys
from pathlib import Path

from tasks.storage import write_file_atomically


def die_half_way(handle):
    handle.write(b"half a dataset")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)


write_file_atomically(Path(sys.argv[1]), die_half_way)
"""


def _killed_write(target: Path) -> Path:
    """Run a write that is killed half way, as a crash would; the temporary file it left."""
    import signal
    import subprocess
    import sys

    before = set(target.parent.iterdir()) if target.parent.exists() else set()
    process = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITE, str(target)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=False,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    (left,) = set(target.parent.iterdir()) - before
    return left


def test_a_killed_writers_temporary_file_is_removed_by_a_later_write_once_stale(
    tmp_path: Path, paylater_home: Path
) -> None:
    # A process killed during a local write left `.<name>.<hex>.tmp` beside the target, and
    # nothing ever removed it: every crash leaked a (possibly dataset-sized) hidden file.
    import os

    store = open_storage((tmp_path / "datasets").as_uri())
    folder = tmp_path / "datasets/training/as_of=2026-07-01"
    other = tmp_path / "datasets/training/as_of=2026-07-02"
    dead = _killed_write(folder / "part-0.parquet")
    live = _killed_write(folder / "part-1.parquet")  # stands for a writer still at work
    elsewhere = _killed_write(other / "part-0.parquet")
    assert dead.name.startswith(".part-0.parquet.") and dead.name.endswith(".tmp")
    not_ours = [folder / ".notes.tmp", folder / "part-9.tmp"]
    long_ago = os.stat(dead).st_mtime - 30 * 24 * 3600  # a crash a month ago
    for path in (*not_ours, dead, elsewhere):
        path.touch()
        os.utime(path, (long_ago, long_ago))

    store.write_bytes("training/as_of=2026-07-01/manifest.json", b"{}")

    assert not dead.exists()
    assert live.exists() and live.read_bytes() == b"half a dataset"
    assert all(path.exists() for path in not_ours)
    assert elsewhere.exists()  # until a write into its own folder
    store.write_bytes("training/as_of=2026-07-02/manifest.json", b"{}")
    assert not elsewhere.exists()


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAEXAMPLE:s3cr3t-Pa55@risk-data/paylater",
        "gs://risk-gcs/paylater?token=s3cr3t-Pa55",
        "s3://risk-data/paylater?X-Amz-Signature=s3cr3t-Pa55",
        "file://me:s3cr3t-Pa55@/srv/datasets",
        "file:///srv/datasets?password=s3cr3t-Pa55",
        "ftp://me:s3cr3t-Pa55@host/datasets",
    ],
)
def test_a_dataset_url_holding_credentials_is_refused_without_showing_them(
    url: str, paylater_home: Path
) -> None:
    # The URL's credentials were taken into the storage's URL, which every manifest, MLflow
    # lineage tag and error message quotes: `s3://key:secret@bucket` even became the bucket name.
    with pytest.raises(StorageError) as raised:
        open_storage(url)
    message = str(raised.value)
    assert "s3cr3t-Pa55" not in message
    assert "***" in message
    assert raised.value.__cause__ is None


def test_a_manifest_never_records_what_follows_the_folder_in_a_dataset_url(
    tmp_path: Path, paylater_home: Path
) -> None:
    # file:///x?token=… was written to the manifest as `file:///x?token=…/scoring/…`.
    from datetime import date

    import pyarrow as pa

    from tasks.datasets import write_dataset

    with pytest.raises(StorageError, match=r"\*\*\*"):
        write_dataset(
            open_storage(f"{(tmp_path / 'ds').as_uri()}?token=s3cr3t-Pa55"),
            "scoring",
            date(2026, 7, 1),
            pa.table({"user_id": [1], "as_of": [date(2026, 7, 1)]}),
            features=[],
            sql_hash="x",
            source_watermark=None,
        )
    assert not (tmp_path / "ds").exists()


def test_a_local_folder_not_writable_is_a_storage_error_naming_the_dataset(
    tmp_path: Path, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A folder the build cannot write (or a full disk) surfaced as a bare OSError naming a hidden
    # temporary file, which feature_build retried 30 s later as if it were an I/O hiccup.
    import errno
    import os

    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"")  # a file where the datasets folder should be
    store = open_storage(blocked.as_uri())
    key = "training/as_of=2026-07-01/manifest.json"
    with pytest.raises(
        StorageError,
        match=rf"cannot write {blocked.as_uri()}/{key}: {blocked} is a file, not a folder",
    ):
        store.write_bytes(key, b"{}")

    real_open = os.open

    def denied(path: str, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    store = open_storage((tmp_path / "datasets").as_uri())
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(StorageError, match=r"cannot write .*manifest.json: Permission denied"):
        store.write_bytes(key, b"{}")
    monkeypatch.undo()
    assert not (tmp_path / "datasets" / key).exists()


def test_a_failed_s3_write_between_part_and_manifest_leaves_no_dataset_and_a_rerun_completes_it(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The S3 endpoint goes away after the Parquet part: no reader may see the dataset, and the
    rerun, once the endpoint is back, gives the same part, digest and manifest."""
    from datetime import date

    import boto3
    import pyarrow as pa
    from moto.server import ThreadedMotoServer

    from tasks import datasets
    from tasks.datasets import DatasetError, load_dataset, write_dataset

    for name, value in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_MAX_ATTEMPTS", "1"),  # botocore's retries only slow the test down
    ]:
        monkeypatch.setenv(name, value)
    port = listen_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("PAYLATER_S3_ENDPOINT_URL", endpoint)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="half-way")
    store = open_storage("s3://half-way/ds")
    day = date(2026, 7, 1)
    table = pa.table({"user_id": [2, 1], "as_of": [day, day], "f": [0.5, 1.5]})

    real_write = store.write_bytes

    def endpoint_dies_after_the_part(key: str, data: bytes) -> None:
        real_write(key, data)
        if key.endswith(".parquet"):
            server.stop()

    monkeypatch.setattr(store, "write_bytes", endpoint_dies_after_the_part)
    build = {"features": ["f"], "sql_hash": "h", "source_watermark": None}
    try:
        with pytest.raises(Exception, match="Could not connect"):
            write_dataset(store, "scoring", day, table, **build)  # type: ignore[arg-type]
    finally:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()  # moto keeps its buckets in the process: the part is still there
    try:
        monkeypatch.undo()
        monkeypatch.setenv("PAYLATER_S3_ENDPOINT_URL", endpoint)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(name, "testing" if name != "AWS_DEFAULT_REGION" else "us-east-1")
        store = open_storage("s3://half-way/ds")
        with pytest.raises(DatasetError, match="no complete scoring dataset"):
            load_dataset("scoring", day, store)
        first = write_dataset(store, "scoring", day, table, **build)  # type: ignore[arg-type]
        manifest = store.read_bytes("scoring/as_of=2026-07-01/manifest.json")
        monkeypatch.setattr(datasets, "datetime", _LaterClock)
        again = write_dataset(store, "scoring", day, table, **build)  # type: ignore[arg-type]
        assert again == first and again.built_at == first.built_at
        assert store.read_bytes("scoring/as_of=2026-07-01/manifest.json") == manifest
        loaded, _ = load_dataset("scoring", day, store)
        assert loaded["user_id"].to_pylist() == [1, 2]
    finally:
        server.stop()


class _LaterClock(datetime):
    """datetime whose now() is far later: a rebuild's built_at cannot equal the first one's."""

    @classmethod
    def now(cls, tz: object = None) -> _LaterClock:
        return cls(2099, 1, 1, tzinfo=UTC)


def test_s3_without_credentials_is_a_storage_error_naming_the_dataset(
    moto_endpoint: str, paylater_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # botocore's NoCredentialsError ("Unable to locate credentials") named no bucket and, not a
    # StorageError, was retried by feature_build as an I/O hiccup.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps credentials once found
    monkeypatch.setenv("PAYLATER_S3_ENDPOINT_URL", moto_endpoint)
    store = open_storage("s3://risk-data/paylater")
    with pytest.raises(
        StorageError, match=r"cannot write s3://risk-data/paylater/x\.json: .*credentials"
    ):
        store.write_bytes("x.json", b"{}")


def test_gcs_without_credentials_is_a_storage_error_naming_the_dataset(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    def no_credentials(*args: object, **kwargs: object) -> object:
        raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setattr(google.auth, "default", no_credentials)
    with pytest.raises(
        StorageError, match=r"gs://risk-gcs/paylater: .*credentials were not found.*GCS_BLOCK"
    ):
        open_storage("gs://risk-gcs/paylater")


def test_credentials_the_bucket_refuses_are_a_storage_error_and_leave_no_dataset(
    moto_endpoint: str, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials S3 refuses (moto enforcing authentication): one StorageError naming the
    object, which feature_build does not retry, and nothing a reader could take for a dataset."""
    from datetime import date

    import boto3
    import pyarrow as pa
    from moto import settings as moto_settings

    from tasks.datasets import available_as_ofs, write_dataset

    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="denied")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTKNOWNHERE")
    monkeypatch.setenv("PAYLATER_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # authentication on
    store = open_storage("s3://denied/ds")
    day = date(2026, 7, 1)
    with pytest.raises(
        StorageError,
        match=r"cannot write s3://denied/ds/scoring/as_of=2026-07-01/part-.*InvalidAccessKeyId",
    ):
        write_dataset(
            store,
            "scoring",
            day,
            pa.table({"user_id": [1], "as_of": [day]}),
            features=[],
            sql_hash="h",
            source_watermark=None,
        )
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    assert available_as_ofs(store, "scoring") == []


def test_a_local_file_that_cannot_be_read_is_a_storage_error_naming_the_dataset(
    tmp_path: Path, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dataset written by another user with a restrictive umask: the retrain (or a rebuild
    # checking the manifest it would keep) got a bare PermissionError.
    import errno

    store = open_storage((tmp_path / "datasets").as_uri())
    key = "training/as_of=2026-07-01/manifest.json"
    store.write_bytes(key, b"{}")

    def denied(self: Path) -> bytes:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(StorageError, match=r"cannot read .*manifest\.json: Permission denied"):
        store.read_bytes(key)


def test_an_s3_endpoint_url_carrying_credentials_is_refused_without_showing_them(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # botocore quotes its endpoint whole in every connection error ('Could not connect to the
    # endpoint URL: "http://key:secret@minio:9000/bucket/key"'), which reached logs and alerts.
    monkeypatch.setenv("PAYLATER_S3_ENDPOINT_URL", "http://minio:s3cr3t-Pa55@127.0.0.1:9")
    with pytest.raises(StorageError, match=r"PAYLATER_S3_ENDPOINT_URL .*\*\*\*") as raised:
        open_storage("s3://risk-data/paylater")
    assert "s3cr3t-Pa55" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "setting"),
    [
        ("s3://risk-data/ds", "PAYLATER_DATASET_S3_BLOCK"),
        ("gs://risk-data/ds", "PAYLATER_DATASET_GCS_BLOCK"),
    ],
)
def test_a_missing_storage_block_is_a_storage_error_naming_the_setting_and_block(
    prefect_harness: None,
    paylater_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    setting: str,
) -> None:
    # Prefect's Block.load raises ValueError("Unable to find block document named ..."): the
    # feature build took it for a hiccup and retried it 30 s later, to fail the same way.
    monkeypatch.setenv(setting, "no-such-datasets-block")
    with pytest.raises(StorageError) as refused:
        open_storage(url, Settings())
    message = str(refused.value)
    assert setting in message and "'no-such-datasets-block'" in message
    assert "block the Prefect API knows" in message and "Unable to find block" in message
