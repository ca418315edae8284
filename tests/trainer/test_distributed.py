"""Two torchrun "nodes" on this machine (gloo) train one model together, each serving
its own metrics."""

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.parser import text_string_to_metric_families

from difftrain.local import free_port
from tests.trainer import runner


def test_two_nodes_train_in_sync_and_write_outputs_once(tmp_path, shapes_folder, trainer_cache):
    output = tmp_path / "out"
    config = runner.write_config(
        tmp_path,
        {
            "dataset": {"uri": f"file://{shapes_folder}"},
            "output": {"uri": f"file://{output}"},
            "training": {"steps": 4, "batchSize": 4},
            "checkpoints": {"everySteps": 2},
            "resources": {"nodes": 2},
        },
    )
    metrics_ports = [free_port(), free_port()]
    nodes = runner.start_nodes(config, tmp_path, metrics_ports=metrics_ports)
    ranks = {}
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(node.communicate, timeout=300) for node in nodes]
        while not all(d.done() for d in done):
            for node, metrics_port in enumerate(metrics_ports):
                ranks[node] = ranks.get(node) or _rank_labels(metrics_port)
            time.sleep(0.1)
        logs = [d.result()[0] for d in done]

    assert [node.returncode for node in nodes] == [0, 0], logs
    prints = [re.findall(r"step 4: weights fingerprint (\S+)", log) for log in logs]
    assert len(prints[0]) == 1 and prints[0] == prints[1], prints
    assert sorted(p.name for p in (output / "checkpoints" / "step-00000004").iterdir()) == [
        "COMPLETE",
        "optimizer.pt",
        "position.json",
        "rng-0.pt",
        "rng-1.pt",
        "run.json",
        "scheduler.pt",
        "trainable.safetensors",
    ]
    assert ["model exported" in log for log in logs] == [True, False]
    assert ranks == {0: {"0"}, 1: {"1"}}  # each node's endpoint, with its global rank
    assert not (tmp_path / "node1" / "scratch-rank1" / "model").exists()


def _rank_labels(port: int) -> set[str] | None:
    """The ``rank`` labels of the difftrain metrics on ``port``; None if unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {
        sample.labels["rank"]
        for family in text_string_to_metric_families(text)
        if family.name.startswith("difftrain_")
        for sample in family.samples
    }
