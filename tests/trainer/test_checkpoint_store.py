"""Which checkpoints count as complete, which is newest, and pruning by run."""

import json

from difftrain.storage import open_store
from difftrain.trainer import checkpoint
from difftrain.trainer.cache import cached_folder


def _checkpoint(store, step, complete=True, run="this", saved_at=None):
    prefix = checkpoint.step_prefix(step)
    if run is not None:
        record = {"run": run, "savedAt": saved_at or f"2026-01-01T00:00:{step:02d}"}
        store.write_bytes(f"{prefix}/run.json", json.dumps(record).encode())
    store.write_bytes(f"{prefix}/trainable.safetensors", b"w")
    if complete:
        store.write_bytes(f"{prefix}/{checkpoint.MARKER}", b"")


def _folders(store) -> set[int]:
    return {int(key.split("/")[1][5:]) for key in store.keys("checkpoints")}


def test_only_checkpoints_with_the_marker_are_complete(tmp_path):
    store = open_store(f"file://{tmp_path}")
    _checkpoint(store, 5)
    _checkpoint(store, 10, complete=False)
    _checkpoint(store, 15)
    store.write_bytes("checkpoints/notes.txt", b"")
    store.write_bytes("checkpoints/step-abc/COMPLETE", b"")

    assert checkpoint.complete_steps(store) == [5, 15]


def test_newest_is_the_last_written_complete_checkpoint(tmp_path):
    store = open_store(f"file://{tmp_path}")
    _checkpoint(store, 100, run="old", saved_at="2026-01-01T00:00:00")
    _checkpoint(store, 10, run="new", saved_at="2026-02-01T00:00:00")  # a later, shorter run
    _checkpoint(store, 20, complete=False, run="new", saved_at="2026-02-02T00:00:00")

    latest = checkpoint.newest(checkpoint.catalog(store))

    assert (latest.step, latest.run) == (10, "new")


def test_prune_touches_only_this_runs_checkpoints(tmp_path):
    store = open_store(f"file://{tmp_path}")
    for step in (5, 10, 15, 20):
        _checkpoint(store, step)
    _checkpoint(store, 12, complete=False)  # crashed mid-save: dead
    _checkpoint(store, 25, complete=False)  # newer than all: maybe being written now
    for step in (3, 30, 40):  # another run's, older and newer
        _checkpoint(store, step, run="other")
    _checkpoint(store, 7, complete=False, run=None)  # no record: whose, unknown
    ledger = checkpoint.Ledger.of(store, "this", checkpoint.catalog(store))

    ledger.prune(keep=2)

    assert _folders(store) == {3, 7, 15, 20, 25, 30, 40}
    assert not (tmp_path / "checkpoints" / "step-00000005").exists()
    assert ledger.complete == {15, 20} and ledger.partial == {25}


def test_clearing_a_step_of_another_run_removes_its_marker_and_files(tmp_path):
    store = open_store(f"file://{tmp_path}")
    _checkpoint(store, 5, run="other")
    _checkpoint(store, 10, run="other")
    ledger = checkpoint.Ledger.of(store, "this", checkpoint.catalog(store))

    ledger.clear(5)
    ledger.clear(7)  # nothing there: nothing to do

    assert _folders(store) == {10}
    assert ledger.others == {10: "other"}


def test_fingerprint_tells_weights_apart():
    import torch

    same = {"a": torch.ones(3), "b": torch.zeros(2)}

    assert checkpoint.fingerprint(same) == checkpoint.fingerprint(dict(same))
    assert checkpoint.fingerprint(same) != checkpoint.fingerprint({"a": torch.ones(3) * 1.0001})


def test_cache_fills_once_and_redoes_an_interrupted_fill(tmp_path):
    calls = []

    def fill(folder):
        calls.append(folder)
        (folder / "data").write_text("x")

    first = cached_folder(tmp_path, "s3://b/model", fill)
    second = cached_folder(tmp_path, "s3://b/model", fill)
    (first / ".complete").unlink()  # as if the process died before finishing
    (first / "half-written").write_text("")
    third = cached_folder(tmp_path, "s3://b/model", fill)

    assert first == second == third
    assert len(calls) == 2
    assert sorted(p.name for p in third.iterdir()) == [".complete", "data"]
