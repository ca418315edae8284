"""``difftrain compare`` on two real runs, one read from a file:// output and one from
the local S3 server; the HTML report checked in headless Chromium."""

import json
import os
import shutil
from pathlib import Path

import pytest

from difftrain.cli import main
from difftrain.storage import S3Settings, open_store
from tests import runs
from tests.browser import Browser, chromium_binary

ROOT = Path(__file__).resolve().parent.parent
# Screenshots and reports the tests keep for people to look at.
ARTIFACTS = Path(os.environ.get("DIFFTRAIN_TEST_ARTIFACTS", ROOT / "test-artifacts"))
PROMPTS = runs.PROMPTS


@pytest.fixture
def outputs(two_runs, s3_env, bucket):
    """The first run on disk, the second uploaded to the local S3 server."""
    first, second = two_runs
    settings = S3Settings(endpoint=s3_env.endpoint, path_style=True)
    open_store(f"s3://{bucket}/runs/b", settings).upload_tree(second, "")
    return f"file://{first}", f"s3://{bucket}/runs/b", s3_env.endpoint


def _compare(capsys, *args) -> tuple[int, str, str]:
    code = main(["compare", *args])
    said = capsys.readouterr()
    return code, said.out, said.err


def test_the_json_has_each_runs_scores_the_spec_differences_and_common_samples(
    capsys, outputs, two_runs
):
    first, second, endpoint = outputs

    code, out, err = _compare(
        capsys, first, second, "--json", "--endpoint", endpoint, "--path-style"
    )

    assert code == 0, err
    numbers = json.loads(out)
    for run, folder in zip(numbers["runs"], two_runs, strict=True):
        result = json.loads((folder / "model" / "evaluation.json").read_text())
        record = json.loads((folder / "model" / "difftrain.json").read_text())
        assert run["scores"] == {
            "clipScore": result["clipScore"],
            "validationLoss": result["validationLoss"],
            "finalLoss": record["finalLoss"],
            "evaluatedAt": 4,
        }
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line) for line in lines]
        assert run["lossCurve"] == [[e["step"], e["loss"]] for e in losses if "loss" in e]
    differences = {d["field"]: d["values"] for d in numbers["specDifferences"]}
    assert differences["training.learningRate"] == [0.001, 0.003]
    assert set(differences) == {"training.learningRate", "output.uri"}
    assert numbers["samples"] == {
        "step": 4,
        "rows": [{"prompt": p, "seed": s} for s, p in enumerate(PROMPTS)],
    }
    lower = min(r["scores"]["validationLoss"] for r in numbers["runs"])
    assert [
        numbers["runs"][i]["scores"]["validationLoss"] for i in numbers["best"]["validationLoss"]
    ] == [lower]
    assert not Path("compare.html").exists()  # --json alone writes no report


def test_the_report_loads_in_chromium_and_shows_the_jsons_numbers(tmp_path, capsys, outputs):
    first, second, endpoint = outputs
    report = tmp_path / "report.html"
    code, out, err = _compare(
        capsys, first, second, "-o", str(report), "--json", "--endpoint", endpoint, "--path-style"
    )
    assert code == 0, err
    numbers = json.loads(out)

    browser = Browser(chromium_binary())  # make test installs it
    try:
        browser.open(report.as_uri())
        images = browser.evaluate(
            "[...document.images].map(i => ({complete: i.complete, width: i.naturalWidth}))"
        )
        cells = browser.evaluate(
            "[...document.querySelectorAll('td[data-score]')].map(c => ({score: c.dataset.score,"
            " run: Number(c.dataset.run), value: c.dataset.value, text: c.textContent,"
            " best: c.classList.contains('best')}))"
        )
        curves = browser.evaluate("document.querySelectorAll('polyline.curve').length")
        shot = browser.screenshot(ARTIFACTS / "compare-report.png")
        errors = browser.errors()
    finally:
        browser.close()
    shutil.copy(report, ARTIFACTS / "compare-report.html")

    assert errors == []
    assert len(images) == 2 * len(PROMPTS)
    assert all(image["complete"] and image["width"] > 0 for image in images), images
    assert curves == 2
    assert shot.stat().st_size > 10_000
    assert len(cells) == 2 * 3  # CLIP score, validation loss, final loss
    for cell in cells:
        expected = numbers["runs"][cell["run"]]["scores"][cell["score"]]
        assert float(cell["value"]) == expected
        assert cell["text"].removesuffix(" ★") == f"{expected:.4f}"
        assert cell["best"] == (cell["run"] in numbers["best"][cell["score"]])


def test_generate_makes_the_images_from_each_runs_model(tmp_path, capsys, two_runs):
    first, second = two_runs
    report = tmp_path / "generated.html"

    code, out, err = _compare(
        capsys,
        f"file://{first}",
        f"file://{second}",
        "--generate",
        "--prompt",
        "a green star",
        "--steps",
        "2",
        "--json",
        "-o",
        str(report),
    )

    assert code == 0, err
    numbers = json.loads(out)
    assert numbers["samples"] == {
        "step": "generated",
        "rows": [{"prompt": "a green star", "seed": 0}],
    }
    page = report.read_text()
    assert page.count('<img class="sample"') == 2 and "generated now" in page


def test_an_output_without_a_finished_run_is_named(tmp_path, capsys, two_runs):
    empty = tmp_path / "unfinished"
    empty.mkdir()

    code, _, err = _compare(capsys, f"file://{two_runs[0]}", f"file://{empty}")

    assert code == 2
    assert err.strip() == (
        f"file://{empty}: no model/difftrain.json; compare reads finished runs (their "
        "exported model's record)"
    )


def test_one_output_is_not_a_comparison(capsys, two_runs):
    code, _, err = _compare(capsys, f"file://{two_runs[0]}")

    assert code == 2
    assert "compare needs at least two outputs" in err
