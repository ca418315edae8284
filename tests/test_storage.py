"""difftrain.storage against a local folder and a real S3 protocol server."""

import json
import os

import pytest

from difftrain import storage
from difftrain.errors import DatasetError, InvalidSpec, StorageAccessDenied, StorageUnavailable
from difftrain.storage import S3Settings, open_store


def test_write_read_list_delete(store):
    store.write_bytes("a/one.txt", b"1")
    store.write_bytes("a/two.txt", b"22")
    store.write_bytes("ab/three.txt", b"333")

    assert store.read_bytes("a/two.txt") == b"22"
    assert store.keys() == ["a/one.txt", "a/two.txt", "ab/three.txt"]
    assert store.keys("a") == ["a/one.txt", "a/two.txt"]  # not ab/
    assert (store.exists("a/one.txt"), store.exists("a/none"), store.exists("a")) == (
        True,
        False,
        False,
    )

    store.delete(["a/one.txt", "never-there"])
    store.delete_tree("ab")

    assert store.keys() == ["a/two.txt"]


def test_child_store_is_rooted_below(store):
    child = store.child("checkpoints/step-1")
    child.write_bytes("state.pt", b"s")

    assert store.keys() == ["checkpoints/step-1/state.pt"]
    assert child.keys() == ["state.pt"]
    assert child.uri == store.uri + "/checkpoints/step-1"


def test_missing_object_is_file_not_found(store, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.bin does not exist"):
        store.read_bytes("missing.bin")
    with pytest.raises(FileNotFoundError, match=r"missing\.bin does not exist"):
        store.download("missing.bin", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_tree_round_trip_in_parallel(store, tmp_path):
    source = tmp_path / "src"
    for index in range(20):
        (source / f"d{index % 3}").mkdir(parents=True, exist_ok=True)
        (source / f"d{index % 3}" / f"f{index}.bin").write_bytes(os.urandom(100 + index))

    keys = store.upload_tree(source, "model")
    files = store.download_tree("model", tmp_path / "dst", unsafe_error=InvalidSpec)

    assert len(keys) == len(files) == 20
    for path in source.rglob("*.bin"):
        copy = tmp_path / "dst" / path.relative_to(source)
        assert copy.read_bytes() == path.read_bytes()


def test_a_tree_download_shows_its_bytes_where_someone_watches(
    store, tmp_path, monkeypatch, capsys
):
    (tmp_path / "src").mkdir()
    for index in range(3):
        (tmp_path / "src" / f"f{index}.bin").write_bytes(os.urandom(1000))
    store.upload_tree(tmp_path / "src", "model")

    store.download_tree("model", tmp_path / "quiet", unsafe_error=InvalidSpec)
    quiet = capsys.readouterr().err
    monkeypatch.setenv("DIFFTRAIN_PROGRESS", "1")  # as difftrain run sets it on a terminal
    store.download_tree("model", tmp_path / "shown", unsafe_error=InvalidSpec)
    shown = capsys.readouterr().err

    assert quiet == ""  # no terminal: the logs stay free of bars
    final = shown.split("\r")[-1]
    assert final.startswith(f"{store.uri}/model (3 files): 100%")
    assert "2.93k/2.93k" in final  # 3000 bytes, in KiB


def test_bars_stay_off_on_all_but_a_nodes_first_process(monkeypatch, capsys):
    from difftrain import bars

    monkeypatch.setenv("DIFFTRAIN_PROGRESS", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with bars.bar(3, "work") as shown:
        shown.update(3)

    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    with bars.bar(3, "work") as shown:
        shown.update(3)
    assert "work: 100%" in capsys.readouterr().err


def _files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("key", "why", "error"),
    [
        pytest.param(
            "images/../../../escaped.txt",
            "its key has a '..' part",
            DatasetError,
            id="dot-dot-inside",
        ),
        pytest.param("../escaped.txt", "its key has a '..' part", DatasetError, id="dot-dot-first"),
        pytest.param("images/..", "its key has a '..' part", InvalidSpec, id="dot-dot-last"),
        pytest.param("/escaped.txt", "its key starts with '/'", InvalidSpec, id="absolute"),
        pytest.param(
            "//etc/escaped.txt", "its key starts with '/'", DatasetError, id="absolute-double-slash"
        ),
    ],
)
def test_a_key_that_would_leave_the_destination_is_refused(
    s3_env, bucket, tmp_path, key, why, error
):
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key="data/images/a.png", Body=b"a")
    client.put_object(Bucket=bucket, Key=f"data/{key}", Body=b"x")  # stored as it is
    store = open_store(f"s3://{bucket}/data", S3Settings(endpoint=s3_env.endpoint))
    destination = tmp_path / "cache" / "entry"
    destination.mkdir(parents=True)

    with pytest.raises(error) as raised:
        store.download_tree("", destination, unsafe_error=error)

    assert str(raised.value) == (
        f"s3://{bucket}/data: the object {key!r} would be written outside the folder it is "
        f"copied into ({why}); rename or delete it"
    )
    assert _files_under(tmp_path) == []  # nothing copied, not even the safe keys


def test_a_link_out_of_the_destination_is_refused(tmp_path):
    (tmp_path / "source" / "images").mkdir(parents=True)
    (tmp_path / "source" / "images" / "a.png").write_bytes(b"a")
    (tmp_path / "elsewhere").mkdir()
    destination = tmp_path / "destination"
    destination.mkdir()
    (destination / "images").symlink_to(tmp_path / "elsewhere")
    store = open_store(f"file://{tmp_path}/source")

    with pytest.raises(DatasetError) as raised:
        store.download_tree("", destination, unsafe_error=DatasetError)

    assert str(raised.value) == (
        f"file://{tmp_path}/source: the object 'images/a.png' would be written outside the "
        "folder it is copied into (a link on the way leads out of it); rename or delete it"
    )
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize(
    ("prefix", "files"),
    [
        pytest.param("", ["captions/a.txt", "images/a.png", "images/sub/b.png"], id="whole-store"),
        pytest.param("images", ["a.png", "sub/b.png"], id="below-a-marked-prefix"),
    ],
)
def test_folder_markers_are_skipped(s3_env, bucket, tmp_path, prefix, files):
    client = s3_env.client()
    markers = ["data/", "data/images/", "data/images/sub/", "data/captions/"]  # as consoles make
    for key in markers + [
        f"data/{name}" for name in ("images/a.png", "images/sub/b.png", "captions/a.txt")
    ]:
        client.put_object(Bucket=bucket, Key=key, Body=b"" if key in markers else key.encode())
    store = open_store(f"s3://{bucket}/data", S3Settings(endpoint=s3_env.endpoint))

    targets = store.download_tree(prefix, tmp_path / "d", unsafe_error=DatasetError)

    assert targets == [tmp_path / "d" / name for name in files]
    assert _files_under(tmp_path / "d") == files
    assert (tmp_path / "d" / files[0]).read_bytes() == _join_key("data", prefix, files[0])


def _join_key(*parts):
    return "/".join(part for part in parts if part).encode()


def _deny_deleting(client, bucket, pattern):
    statement = {
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:DeleteObject",
        "Resource": f"arn:aws:s3:::{bucket}/{pattern}",
    }
    policy = {"Version": "2012-10-17", "Statement": [statement]}  # IAM allows the rest
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def test_objects_a_policy_keeps_are_reported_and_the_others_deleted(s3_env, bucket):
    _deny_deleting(s3_env.client(), bucket, "root/protected/*")
    store = open_store(f"s3://{bucket}/root", S3Settings(endpoint=s3_env.endpoint))
    for key in ("protected/a", "free/b", "protected/c", "d"):
        store.write_bytes(key, b"x")

    with pytest.raises(StorageAccessDenied) as raised:
        store.delete(["protected/a", "free/b", "protected/c", "d", "never-there"])

    assert str(raised.value) == (
        f"delete s3://{bucket}/root/protected/a, s3://{bucket}/root/protected/c: 2 of 5 "
        "objects not deleted, access denied (AccessDenied); check the credentials "
        "(spec.storage.secretRef) and the bucket's policy"
    )
    assert store.keys() == ["protected/a", "protected/c"]


def _failures(*pairs):
    return [{"Key": key, "Code": code, "Message": "..."} for key, code in pairs]


@pytest.mark.parametrize(
    ("failures", "total", "error", "message"),
    [
        pytest.param(
            _failures(("k/1", "AccessDenied")),
            3,
            StorageAccessDenied,
            "delete s3://b/k/1: 1 of 3 objects not deleted, access denied (AccessDenied); "
            "check the credentials (spec.storage.secretRef) and the bucket's policy",
            id="denied",
        ),
        pytest.param(
            _failures(("k/1", "InternalError"), ("k/2", "SlowDown")),
            2,
            StorageUnavailable,
            "delete s3://b/k/1, s3://b/k/2: 2 of 2 objects not deleted (InternalError)",
            id="unavailable",
        ),
        pytest.param(
            _failures(("k/1", "InternalError"), ("k/2", "AccessDenied")),
            9,
            StorageAccessDenied,
            "delete s3://b/k/2: 2 of 9 objects not deleted, access denied (AccessDenied); "
            "check the credentials (spec.storage.secretRef) and the bucket's policy",
            id="denied-wins-over-unavailable",
        ),
        pytest.param(
            _failures(*((f"k/{i}", "InternalError") for i in range(5))),
            1000,
            StorageUnavailable,
            "delete s3://b/k/0, s3://b/k/1, s3://b/k/2, ...: 5 of 1000 objects not deleted "
            "(InternalError)",
            id="many",
        ),
    ],
)
def test_per_key_delete_failures_become_errors(failures, total, error, message):
    raised = storage.delete_error("b", failures, total)

    assert (type(raised), str(raised)) == (error, message)


def test_listing_follows_pages(store, monkeypatch):
    monkeypatch.setattr(storage, "LIST_PAGE_SIZE", 2)
    for index in range(7):
        store.write_bytes(f"k/{index}", b"")

    assert store.keys("k") == [f"k/{index}" for index in range(7)]


def test_large_upload_is_multipart(s3_env, bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_BYTES", 5 * 1024 * 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    store = open_store(f"s3://{bucket}/m", S3Settings(endpoint=s3_env.endpoint))

    store.upload(big, "big.bin")

    head = s3_env.client().head_object(Bucket=bucket, Key="m/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    store.download("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_path_style_addressing(s3_env, bucket):
    store = open_store(f"s3://{bucket}/p", S3Settings(endpoint=s3_env.endpoint, path_style=True))

    store.write_bytes("x", b"ok")

    assert store.read_bytes("x") == b"ok"


def test_wrong_credentials_are_denied_without_leaking_them(s3_env, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    store = open_store(f"s3://{bucket}/data", S3Settings(endpoint=s3_env.endpoint))

    with pytest.raises(StorageAccessDenied) as raised:
        store.keys()

    message = str(raised.value)
    assert message == (
        f"list s3://{bucket}/data/: access denied (InvalidAccessKeyId); check the credentials "
        "(spec.storage.secretRef) and the bucket's policy"
    )
    assert raised.value.exit_code == 4


def test_missing_bucket_is_named(s3_env):
    store = open_store("s3://no-such-bucket/x", S3Settings(endpoint=s3_env.endpoint))

    with pytest.raises(StorageAccessDenied, match="bucket 'no-such-bucket' does not exist"):
        store.write_bytes("a", b"")


def test_read_only_user_cannot_write(s3_env, bucket, monkeypatch):
    for name, value in s3_env.reader.env().items():
        monkeypatch.setenv(name, value)
    store = open_store(f"s3://{bucket}/out", S3Settings(endpoint=s3_env.endpoint))

    assert store.keys() == []
    with pytest.raises(StorageAccessDenied, match=rf"write s3://{bucket}/out/a: access denied"):
        store.write_bytes("a", b"")


def test_missing_credentials_are_reported(s3_env, bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(f"s3://{bucket}/x", S3Settings(endpoint=s3_env.endpoint))

    with pytest.raises(
        StorageAccessDenied, match=r"no S3 credentials; set spec\.storage\.secretRef"
    ):
        store.keys()


def test_unreachable_endpoint_is_retryable(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the default 8 only takes longer
    store = open_store("s3://bucket-x/x", S3Settings(endpoint="http://127.0.0.1:9"))

    with pytest.raises(StorageUnavailable, match=r"cannot reach http://127\.0\.0\.1:9;") as raised:
        store.read_bytes("a")

    assert raised.value.exit_code == 1


@pytest.mark.parametrize("value", ["0", "many", "-1"])
def test_a_bad_number_of_attempts_is_named(s3_env, monkeypatch, value):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", value)
    store = open_store("s3://bucket-x/x", S3Settings(endpoint="http://127.0.0.1:9"))

    with pytest.raises(
        InvalidSpec, match=f"AWS_MAX_ATTEMPTS must be a whole number of at least 1, not '{value}'"
    ):
        store.read_bytes("a")


def test_unwritable_local_output_is_denied(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    store = open_store(f"file://{tmp_path}/blocker/out")

    with pytest.raises(StorageAccessDenied, match=r"cannot write file://.*/blocker/out/x: "):
        store.write_bytes("x", b"data")


def test_failed_local_write_leaves_nothing(tmp_path):
    store = open_store(f"file://{tmp_path}")

    with pytest.raises(StorageAccessDenied):
        store.upload(tmp_path / "not-there", "copy.bin")

    assert list(tmp_path.iterdir()) == []


def test_relative_file_uri_is_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    open_store("file://out/run").write_bytes("a.txt", b"x")

    assert (tmp_path / "out" / "run" / "a.txt").read_bytes() == b"x"


def test_writability_is_checked_without_leaving_anything(store):
    store.check_writable()

    assert store.keys() == []


def test_a_file_in_the_way_is_not_writable(tmp_path):
    (tmp_path / "blocker").write_text("")

    with pytest.raises(StorageAccessDenied, match=r"blocker is not a writable folder"):
        open_store(f"file://{tmp_path}/blocker/out/run").check_writable()


def test_read_only_credentials_are_not_writable(s3_env, bucket, monkeypatch):
    for name, value in s3_env.reader.env().items():
        monkeypatch.setenv(name, value)

    with pytest.raises(StorageAccessDenied, match="access denied"):
        open_store(f"s3://{bucket}/out", S3Settings(endpoint=s3_env.endpoint)).check_writable()


def test_the_fingerprint_changes_when_an_object_is_written_added_or_removed(store):
    store.write_bytes("data/a.txt", b"1")
    store.write_bytes("data/b.txt", b"2")
    store.write_bytes("other.txt", b"elsewhere")
    before = store.fingerprint("data")
    only_b = store.fingerprint("data", lambda key: key.endswith("b.txt"))

    assert list(store.tags("data")) == ["data/a.txt", "data/b.txt"]
    assert store.fingerprint("data") == before  # listing again changes nothing
    store.write_bytes("other.txt", b"changed")  # outside the prefix
    assert store.fingerprint("data") == before
    store.write_bytes("data/a.txt", b"changed")
    changed = store.fingerprint("data")
    assert changed != before
    assert store.fingerprint("data", lambda key: key.endswith("b.txt")) == only_b
    store.write_bytes("data/c.txt", b"3")
    assert store.fingerprint("data") not in (before, changed)
    store.delete(["data/c.txt"])
    assert store.fingerprint("data") == changed


def test_a_changed_dataset_object_is_fetched_again(s3_env, bucket, tmp_path):
    from difftrain.trainer.data import fetch_dataset

    source = open_store(f"s3://{bucket}/data", S3Settings(endpoint=s3_env.endpoint))
    source.write_bytes("a.txt", b"a red circle")
    source.write_bytes("b.txt", b"a blue square")
    settings, cache = S3Settings(endpoint=s3_env.endpoint), tmp_path / "cache"

    first = fetch_dataset(f"s3://{bucket}/data", settings, cache)
    again = fetch_dataset(f"s3://{bucket}/data", settings, cache)
    source.write_bytes("a.txt", b"a green circle")
    changed = fetch_dataset(f"s3://{bucket}/data", settings, cache)

    assert again == first  # nothing changed: the node's copy is used
    assert (changed / "a.txt").read_text() == "a green circle"
    assert (first / "a.txt").read_text() == "a red circle"  # a run reading it keeps it


def test_a_model_written_anew_is_fetched_again(s3_env, bucket, tmp_path):
    from difftrain.api.data import ModelSpec
    from difftrain.trainer.models import fetch_model

    source = open_store(f"s3://{bucket}/model", S3Settings(endpoint=s3_env.endpoint))
    source.write_bytes("model_index.json", b"{}")
    source.write_bytes("unet/diffusion_pytorch_model.safetensors", b"weights 1")
    settings, cache = S3Settings(endpoint=s3_env.endpoint), tmp_path / "cache"
    model = ModelSpec(base=f"s3://{bucket}/model")

    first = fetch_model(model, settings, cache)
    configs = fetch_model(model, settings, cache, weights=False)
    source.write_bytes("unet/diffusion_pytorch_model.safetensors", b"weights 2")

    assert fetch_model(model, settings, cache, weights=False) == configs  # no config changed
    changed = fetch_model(model, settings, cache)
    assert changed != first
    assert (changed / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == b"weights 2"
    assert not (configs / "unet").exists()
