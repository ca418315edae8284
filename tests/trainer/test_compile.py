"""training.compile: the denoiser's blocks compiled in place train as they do eagerly.

The tests trace with the aot_eager backend (DIFFTRAIN_COMPILE_BACKEND): the same graph
capture and autograd as inductor's, without its code generation, which takes about
three minutes on two cores for the tiny UNet. Inductor's numbers are in docs/trainer.md.
"""

import json

import pytest

from tests.trainer import runner
from tests.trainer.test_resume import ONE_THREAD


def test_a_compiled_denoiser_trains_as_the_eager_one(tmp_path, trainer_cache):
    runs = []
    for name, compile in (("eager", False), ("compiled", True)):
        folder = tmp_path / name
        folder.mkdir()
        spec = {
            "output": {"uri": f"file://{folder / 'out'}"},
            "training": {"compile": compile},
        }
        extra = {**ONE_THREAD, "DIFFTRAIN_COMPILE_BACKEND": "aot_eager"}
        runs.append((runner.write_config(folder, spec, name), folder, trainer_cache, extra))

    (code_e, log_e), (code_c, log_c) = runner.run_together(runs)

    assert code_e == 0 and code_c == 0, (log_e, log_c)
    assert "compiling: the first step took" in log_c and "compiling" not in log_e
    eager, compiled = (
        [json.loads(line)["loss"] for line in (tmp_path / n / "out" / "metrics.jsonl").open()]
        for n in ("eager", "compiled")
    )
    assert len(eager) == 6 and compiled == pytest.approx(eager, rel=1e-4)
    exported = tmp_path / "compiled" / "out" / "model" / "pytorch_lora_weights.safetensors"
    assert exported.is_file()  # compiled in place: the weights keep their names
