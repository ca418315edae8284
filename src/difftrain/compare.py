"""``difftrain compare``: two or more finished runs side by side.

A run is read from its output (s3:// or file://): ``model/difftrain.json`` (the spec and
the facts of the run), ``metrics.jsonl`` (the loss curve and the evaluations),
``model/evaluation.json`` and the validation samples. The report is one HTML file with
everything inside it (images as data URIs, the loss chart as inline SVG), so it can be
mailed or attached to a review; ``--json`` gives the same numbers to programs.
"""

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from difftrain import contract
from difftrain.errors import InvalidSpec
from difftrain.storage import S3Settings, Store, open_store

# The scores compared, how people call them, and whether lower is better.
SCORES = [
    ("fid", "FID", True),
    ("clipScore", "CLIP score", False),
    ("validationLoss", "Validation loss", True),
    ("finalLoss", "Final training loss", True),
]
# Lines of the loss chart, one colour per run (colour-blind safe, Okabe-Ito).
COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]
CHART = {"width": 760, "height": 300, "left": 60, "right": 20, "top": 20, "bottom": 40}


@dataclass
class Run:
    """What a finished run's output says about it."""

    uri: str
    record: dict  # model/difftrain.json
    curve: list[tuple[int, float]] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    scores: dict = field(default_factory=dict)
    store: Store | None = None

    @property
    def name(self) -> str:
        return self.record.get("name") or self.uri


def load_run(uri: str, settings: S3Settings) -> Run:
    """Read the run at ``uri``; InvalidSpec naming the URI when it holds no finished run."""
    store = open_store(uri.rstrip("/"), settings)
    key = f"{contract.MODEL}/difftrain.json"
    if not store.exists(key):
        raise InvalidSpec(
            f"{uri}: no {key}; compare reads finished runs (their exported model's record)"
        )
    run = Run(uri=uri, record=json.loads(store.read_bytes(key)), store=store)
    if store.exists(contract.METRICS_FILE):
        for line in store.read_bytes(contract.METRICS_FILE).decode().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            if "evaluation" in entry:
                run.evaluations.append(entry["evaluation"])
            elif entry.get("loss") is not None and math.isfinite(entry["loss"]):
                run.curve.append((entry["step"], entry["loss"]))
    result_key = f"{contract.MODEL}/evaluation.json"
    last = json.loads(store.read_bytes(result_key)) if store.exists(result_key) else {}
    last = last or (run.evaluations[-1] if run.evaluations else {})
    run.scores = {key: last[key] for key, _, _ in SCORES if last.get(key) is not None}
    if run.record.get("finalLoss") is not None:
        run.scores["finalLoss"] = run.record["finalLoss"]
    if last.get("step") is not None:
        run.scores["evaluatedAt"] = last["step"]
    return run


def flatten(value, prefix: str = "") -> dict:
    """A nested spec as {dotted.path: value}; lists stay whole."""
    if isinstance(value, dict) and value:
        found = {}
        for key, item in value.items():
            found.update(flatten(item, f"{prefix}.{key}" if prefix else key))
        return found
    return {prefix: value}


def spec_differences(runs: list[Run]) -> list[dict]:
    """The spec fields whose values differ between the runs, each with every run's value
    (None where a run's spec does not have the field)."""
    flat = [flatten(run.record.get("spec", {})) for run in runs]
    differences = []
    for name in sorted(set().union(*flat)):
        values = [f.get(name) for f in flat]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            differences.append({"field": name, "values": values})
    return differences


def best(runs: list[Run]) -> dict:
    """For each score, the indexes of the runs with the best value (ties share it)."""
    marked = {}
    for key, _, lower in SCORES:
        values = [(i, run.scores[key]) for i, run in enumerate(runs) if key in run.scores]
        if len(values) < 2:
            continue
        top = (min if lower else max)(value for _, value in values)
        marked[key] = [i for i, value in values if value == top]
    return marked


def _sample_steps(store: Store) -> dict[int, Store]:
    steps = contract.sample_steps(store.keys(contract.SAMPLES), "prompts.json")
    return {step: store.child(contract.samples_prefix(step)) for step in steps}


def sample_rows(runs: list[Run]) -> dict:
    """The validation samples of the newest step all runs sampled at, one row per
    (prompt, seed) that every run has: ``{"step", "rows": [{"prompt", "seed",
    "images": [PNG bytes per run]}]}``; no rows when the runs share no step."""
    per_run = [_sample_steps(run.store) for run in runs]
    common = set.intersection(*(set(steps) for steps in per_run)) if per_run else set()
    if not common:
        return {"step": None, "rows": []}
    step = max(common)
    indexes = []
    for steps in per_run:
        entries = json.loads(steps[step].read_bytes("prompts.json"))
        indexes.append({(e["prompt"], e["seed"]): e["file"] for e in entries})
    rows = []
    for prompt, seed in indexes[0]:
        if all((prompt, seed) in index for index in indexes):
            images = [
                steps[step].read_bytes(index[prompt, seed])
                for steps, index in zip(per_run, indexes, strict=True)
            ]
            rows.append({"prompt": prompt, "seed": seed, "images": images})
    return {"step": step, "rows": rows}


def generated_rows(
    runs: list[Run],
    prompts: list[str],
    *,
    seed: int,
    steps: int,
    guidance: float,
    base: str | None,
    settings: S3Settings,
    workdir: Path,
) -> dict:
    """Images generated now from each run's model: one row per prompt, each at ``seed``."""
    from difftrain.trainer import sampling

    rows = [{"prompt": p, "seed": seed, "images": []} for p in prompts]
    for index, run in enumerate(runs):
        pipeline, size = _pipeline(run, base, settings, workdir / f"run-{index}")
        made = sampling.generate_each(
            pipeline, [(p, seed) for p in prompts], size=size, steps=steps, guidance=guidance
        )
        for row, (_, _, image) in zip(rows, made, strict=True):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            row["images"].append(buffer.getvalue())
        del pipeline
    return {"step": "generated", "rows": rows}


def _pipeline(run: Run, base: str | None, settings: S3Settings, folder: Path):
    """The run's model as a diffusers pipeline (on a GPU when there is one), and the
    image side it trained at."""
    import torch

    from difftrain import sample

    model = sample.locate(run.uri, settings, folder, folder / "cache", base)
    pipeline = sample.load(model)
    pipeline.set_progress_bar_config(disable=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return pipeline.to(device), model.resolution or 512


def report(runs: list[Run], samples: dict) -> dict:
    """The report's numbers, as ``--json`` prints them (images by name, not content)."""
    return {
        "runs": [
            {
                "uri": run.uri,
                "name": run.name,
                "steps": run.record.get("steps"),
                "scores": run.scores,
                "evaluations": run.evaluations,
                "lossCurve": [[step, loss] for step, loss in run.curve],
            }
            for run in runs
        ],
        "best": best(runs),
        "specDifferences": spec_differences(runs),
        "samples": {
            "step": samples["step"],
            "rows": [{"prompt": row["prompt"], "seed": row["seed"]} for row in samples["rows"]],
        },
    }


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _chart(runs: list[Run]) -> str:
    """The runs' loss curves overlaid, as inline SVG."""
    c = CHART
    width, height = c["width"], c["height"]
    points = [point for run in runs for point in run.curve]
    if not points:
        return '<p class="empty">No loss was recorded.</p>'
    first, last = min(s for s, _ in points), max(s for s, _ in points)
    low, high = min(v for _, v in points), max(v for _, v in points)
    span_x, span_y = max(last - first, 1), (high - low) or 1.0
    inner_w = width - c["left"] - c["right"]
    inner_h = height - c["top"] - c["bottom"]

    def x(step):
        return c["left"] + (step - first) / span_x * inner_w

    def y(value):
        return c["top"] + (high - value) / span_y * inner_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="Training loss of each run">',
        f'<rect x="{c["left"]}" y="{c["top"]}" width="{inner_w}" height="{inner_h}" '
        'fill="none" stroke="#999"/>',
    ]
    for i in range(5):
        value = low + span_y * i / 4
        parts.append(
            f'<text x="{c["left"] - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.3g}</text>'
        )
    for step in (first, (first + last) // 2, last):
        parts.append(
            f'<text x="{x(step):.1f}" y="{height - c["bottom"] + 18}" '
            f'text-anchor="middle">{step}</text>'
        )
    parts.append(
        f'<text x="{c["left"] + inner_w / 2}" y="{height - 6}" text-anchor="middle">step</text>'
    )
    for index, run in enumerate(runs):
        colour = COLOURS[index % len(COLOURS)]
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in run.curve)
        parts.append(
            f'<polyline class="curve" data-run="{index}" fill="none" stroke="{colour}" '
            f'stroke-width="1.5" points="{line}"/>'
        )
    parts.append("</svg>")
    legend = "".join(
        f'<li><span class="swatch" style="background:{COLOURS[i % len(COLOURS)]}"></span>'
        f"{html.escape(run.name)}</li>"
        for i, run in enumerate(runs)
    )
    return "".join(parts) + f'<ul class="legend">{legend}</ul>'


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #e3f4e6; font-weight: 600; }
code { font-size: 12px; word-break: break-all; }
.chart text { font-size: 11px; fill: #444; }
.legend { list-style: none; padding: 0; display: flex; gap: 16px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 6px; }
img.sample { width: 128px; height: 128px; image-rendering: pixelated; display: block; }
.empty { color: #777; }
"""


def render_html(runs: list[Run], samples: dict, numbers: dict) -> str:
    """The self-contained HTML report."""
    names = "".join(f"<th>{html.escape(run.name)}</th>" for run in runs)
    overview = "".join(
        f"<tr><td>{html.escape(run.name)}</td><td><code>{html.escape(run.uri)}</code></td>"
        f"<td class='number'>{run.record.get('steps', '-')}</td></tr>"
        for run in runs
    )
    score_rows = []
    for key, label, lower in SCORES:
        if not any(key in run.scores for run in runs):
            continue
        better = "lower is better" if lower else "higher is better"
        cells = []
        for index, run in enumerate(runs):
            value = run.scores.get(key)
            marked = index in numbers["best"].get(key, [])
            classes = "number best" if marked else "number"
            star = " ★" if marked else ""
            data = f' data-value="{value!r}"' if value is not None else ""
            cells.append(
                f'<td class="{classes}" data-score="{key}" data-run="{index}"{data}>'
                f"{_number(value)}{star}</td>"
            )
        score_rows.append(f"<tr><th>{label} <small>({better})</small></th>{''.join(cells)}</tr>")
    scores = (
        f"<table><tr><th></th>{names}</tr>{''.join(score_rows)}</table>"
        if score_rows
        else '<p class="empty">No scores to compare.</p>'
    )
    differences = numbers["specDifferences"]
    diff_rows = "".join(
        f"<tr><td><code>{html.escape(d['field'])}</code></td>"
        + "".join(f"<td><code>{html.escape(json.dumps(v))}</code></td>" for v in d["values"])
        + "</tr>"
        for d in differences
    )
    spec = (
        f"<table><tr><th>field</th>{names}</tr>{diff_rows}</table>"
        if differences
        else '<p class="empty">The specs are the same.</p>'
    )
    sample_rows = "".join(
        f"<tr><td>{html.escape(row['prompt'])}<br><small>seed {row['seed']}</small></td>"
        + "".join(
            f'<td><img class="sample" alt="{html.escape(run.name)}: '
            f'{html.escape(row["prompt"])}" src="{_png(image)}"></td>'
            for run, image in zip(runs, row["images"], strict=True)
        )
        + "</tr>"
        for row in samples["rows"]
    )
    step = samples["step"]
    where = "generated now" if step == "generated" else f"validation samples of step {step}"
    images = (
        f"<p>{where}</p><table><tr><th>prompt</th>{names}</tr>{sample_rows}</table>"
        if samples["rows"]
        else '<p class="empty">The runs have no samples of a common step and prompt '
        "(use --generate).</p>"
    )
    title = " vs ".join(html.escape(run.name) for run in runs)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>difftrain compare: {title}</title><style>{STYLE}</style></head><body>"
        f"<h1>difftrain compare: {title}</h1>"
        f"<table><tr><th>run</th><th>output</th><th>steps</th></tr>{overview}</table>"
        f"<h2>Scores</h2>{scores}"
        f"<h2>Training loss</h2>{_chart(runs)}"
        f"<h2>Spec differences</h2>{spec}"
        f"<h2>Images</h2>{images}"
        "</body></html>\n"
    )
