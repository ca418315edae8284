"""Which checkpoints count as complete, and pruning."""

from difftrain.storage import open_store
from difftrain.trainer import checkpoint
from difftrain.trainer.cache import cached_folder


def _checkpoint(store, step, complete=True):
    prefix = checkpoint.step_prefix(step)
    store.write_bytes(f"{prefix}/trainable.safetensors", b"w")
    if complete:
        store.write_bytes(f"{prefix}/{checkpoint.MARKER}", b"")


def test_only_checkpoints_with_the_marker_are_complete(tmp_path):
    store = open_store(f"file://{tmp_path}")
    _checkpoint(store, 5)
    _checkpoint(store, 10, complete=False)
    _checkpoint(store, 15)
    store.write_bytes("checkpoints/notes.txt", b"")
    store.write_bytes("checkpoints/step-abc/COMPLETE", b"")

    assert checkpoint.complete_steps(store) == [5, 15]


def test_prune_keeps_the_newest_complete_ones(tmp_path):
    store = open_store(f"file://{tmp_path}")
    for step in (5, 10, 15, 20):
        _checkpoint(store, step)
    _checkpoint(store, 12, complete=False)  # crashed mid-save: dead
    _checkpoint(store, 25, complete=False)  # newer than all: maybe being written now

    checkpoint.prune(store, keep=2)

    assert {key.split("/")[1] for key in store.keys("checkpoints")} == {
        "step-00000015", "step-00000020", "step-00000025"
    }  # fmt: skip
    assert not (tmp_path / "checkpoints" / "step-00000005").exists()


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
