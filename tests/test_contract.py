"""The operator-trainer contract: one home, derived from the errors, and free of torch
(the operator and the CLI import it)."""

import subprocess
import sys

from difftrain import contract
from difftrain.errors import DatasetError, InvalidSpec, Stopped, StorageAccessDenied


def test_contract_imports_without_torch():
    probe = "import sys, difftrain.contract; print(sorted(m for m in sys.modules if m == 'torch'))"

    said = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)

    assert said.stdout.strip() == "[]"


def test_exit_codes_come_from_the_errors():
    permanent = contract.PERMANENT_EXIT_CODES

    assert permanent == {2: "InvalidSpec", 3: "DatasetError", 4: "StorageAccessDenied"}
    assert [permanent[e.exit_code] for e in (InvalidSpec, DatasetError, StorageAccessDenied)] == [
        "InvalidSpec",
        "DatasetError",
        "StorageAccessDenied",
    ]
    assert contract.STOPPED_EXIT_CODE == Stopped.exit_code == 143


def test_output_layout():
    assert contract.checkpoint_prefix(12) == "checkpoints/step-00000012"
    assert contract.samples_prefix(3) == "samples/step-00000003"
    assert contract.stage_root("s3://b/runs/a/") == "s3://b/runs/a"
    assert contract.stage_root("s3://b/runs/a", autoencoder=True) == "s3://b/runs/a/autoencoder"


def test_metrics_of_one_rank_are_read():
    text = (
        'difftrain_step{job="a",namespace="n",rank="0"} 12.0\n'
        'difftrain_step{job="a",namespace="n",rank="1"} 11.0\n'
        'difftrain_samples_generated_total{job="a",namespace="n",rank="0"} 4.0\n'
        'other_metric{rank="0"} 1.0\n'
    )

    assert contract.read_metrics(text) == {"step": 12.0, "samples_generated_total": 4.0}
    assert contract.read_metrics(text, rank="1") == {"step": 11.0}
