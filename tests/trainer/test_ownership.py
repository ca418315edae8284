"""One live job writes an output: the owner record, its conditional writes on a real S3
server and on local folders, and two trainers started on one output."""

import datetime
import json
import time

import pytest

from difftrain.storage import Conflict
from difftrain.trainer import ownership
from difftrain.trainer.ownership import Holder, OutputInUse
from tests.trainer import runner

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)
ME = Holder("team", "sdxl-lora", "uid-1", 2, "pod-a")


def _found(holder: Holder, seconds_ago: float) -> dict:
    heartbeat = NOW - datetime.timedelta(seconds=seconds_ago)
    return {**holder.__dict__, "heartbeat": heartbeat.isoformat()}


@pytest.mark.parametrize(
    ("found", "verdict"),
    [
        pytest.param(_found(ME, 5), "take", id="this-attempt-restarted"),
        pytest.param(
            _found(Holder("team", "sdxl-lora", "uid-1", 1, "pod-b"), 5),
            "take",
            id="earlier-attempt-of-this-job",
        ),
        pytest.param(
            _found(Holder("team", "sdxl-lora", "uid-1", 3, "pod-b"), 5),
            "refuse",
            id="later-attempt-of-this-job",
        ),
        pytest.param(
            _found(Holder("team", "other", "uid-9", 1, "pod-c"), 5), "refuse", id="another-live-job"
        ),
        pytest.param(
            _found(Holder("team", "other", "uid-9", 1, "pod-c"), 601),
            "take",
            id="another-job-gone-silent",
        ),
        pytest.param(
            _found(Holder("team", "sdxl-lora", "uid-0", 1, "pod-c"), 5),
            "wait",
            id="re-created-job-predecessor-stopping",
        ),
        pytest.param(
            _found(Holder("team", "sdxl-lora", "uid-0", 1, "pod-c"), 601),
            "take",
            id="re-created-job-predecessor-gone",
        ),
    ],
)
def test_who_may_take_an_owner_record(found, verdict):
    assert ownership.judge(found, ME, NOW) == verdict


def test_local_runs_are_told_apart_by_machine_and_name():
    here = Holder("default", "demo", "", 1, "laptop")

    assert ownership.judge(_found(here, 5), here, NOW) == "take"
    assert ownership.judge(_found(Holder("default", "demo", "", 1, "other"), 5), here, NOW) == (
        "refuse"
    )


def test_conditional_writes(store):
    tag = store.write_if("owner.json", b"one", None)

    with pytest.raises(Conflict):
        store.write_if("owner.json", b"two", None)  # present already
    newer = store.write_if("owner.json", b"three", tag)
    with pytest.raises(Conflict):
        store.write_if("owner.json", b"four", tag)  # changed since
    assert store.read_tagged("owner.json") == (b"three", newer)
    store.delete(["owner.json"])
    with pytest.raises(Conflict):
        store.write_if("owner.json", b"five", newer)  # gone


def test_a_second_job_is_refused_until_the_first_lets_go(store):
    first = ownership.take(store, Holder("team", "first", "uid-1", 1, "pod-a"))

    with pytest.raises(OutputInUse) as refused:
        ownership.take(store, Holder("team", "second", "uid-2", 1, "pod-b"))
    first.release()
    second = ownership.take(store, Holder("team", "second", "uid-2", 1, "pod-b"))

    assert str(refused.value).startswith(
        f"{store.uri} is being written by job team/first (uid uid-1, on pod-a), last seen 0 s ago"
    )
    assert json.loads(store.read_bytes("owner.json"))["name"] == "second"
    second.release()
    assert not store.exists("owner.json")


def test_a_silent_holder_is_taken_over_and_learns_it(store, monkeypatch):
    monkeypatch.setattr(ownership, "HEARTBEAT_SECONDS", 0.1)
    stale = _found(Holder("team", "gone", "uid-0", 1, "pod-z"), 0)
    stale["heartbeat"] = "2020-01-01T00:00:00+00:00"
    store.write_bytes("owner.json", json.dumps(stale).encode())

    lease = ownership.take(store, ME)
    time.sleep(0.3)  # renewed meanwhile
    renewed = json.loads(store.read_bytes("owner.json"))["heartbeat"]
    assert renewed > "2026"
    assert not lease.lost
    store.write_bytes("owner.json", b'{"taken": "by someone else"}')
    deadline = time.monotonic() + 5
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.05)

    assert lease.lost
    lease.release()  # leaves the new holder's record alone
    assert store.read_bytes("owner.json") == b'{"taken": "by someone else"}'


def test_an_unreadable_owner_record_is_replaced(store):
    store.write_bytes("owner.json", b"not json")

    ownership.take(store, ME).release()

    assert not store.exists("owner.json")


def test_two_trainers_on_one_output(tmp_path, shapes_folder, trainer_cache):
    output = tmp_path / "shared-out"
    spec = {
        "dataset": {"uri": f"file://{shapes_folder}"},
        "output": {"uri": f"file://{output}"},
        "training": {"steps": 100000},
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = runner.write_config(tmp_path / "a", spec, name="first")
    second = runner.write_config(tmp_path / "b", spec, name="second")

    with runner.running(first, tmp_path / "a", trainer_cache):  # killed when the block ends
        deadline = time.monotonic() + 120
        while not (output / "owner.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        code, log = runner.run(second, tmp_path / "b", trainer_cache)

    assert code == 2, log
    assert "OutputInUse: " in log
    assert "is being written by job default/first (uid none, local, on " in log
