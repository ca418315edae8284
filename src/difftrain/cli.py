"""The ``difftrain`` command line."""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from difftrain import __version__
from difftrain.api.crd import render_crds
from difftrain.api.manifests import expand, read_jobs
from difftrain.api.reference import REFERENCE_PATH, render_reference
from difftrain.dashboard import DASHBOARD_PATH
from difftrain.dashboard import render as render_dashboard
from difftrain.errors import InvalidSpec
from difftrain.yamltext import dump_all


def _manifests(names: list[str], recursive: bool) -> list | None:
    """The files ``names`` stand for, or None after saying that there are none."""
    found = expand(names, recursive)
    if not found:
        print(f"{', '.join(names)}: no .yaml, .yml or .json files", file=sys.stderr)
        return None
    return found


def _validate(args: argparse.Namespace) -> int:
    manifests = _manifests(args.files, args.recursive)
    if manifests is None:
        return InvalidSpec.exit_code
    notes: list[str] = []
    _, problems = read_jobs(manifests, notes, _path(args.profile))
    for line in [*notes, *problems]:
        print(line, file=sys.stderr)
    if problems:
        return InvalidSpec.exit_code
    if not args.quiet:
        skipped = sum(note.endswith("; skipped") for note in notes)
        print(f"{len(manifests) - skipped} file(s) valid")
    return 0


def _path(name: str | None) -> Path | None:
    return Path(name) if name else None


def _valid_jobs(names: list[str], recursive: bool, profile: str | None) -> list | None:
    """The jobs in the files ``names`` stand for, each merged with its profile, or None
    after printing their problems."""
    manifests = _manifests(names, recursive)
    if manifests is None:
        return None
    notes: list[str] = []
    jobs, problems = read_jobs(manifests, notes, _path(profile), need_profiles=True)
    for line in [*notes, *problems]:
        print(line, file=sys.stderr)
    return None if problems else jobs


def _render(args: argparse.Namespace) -> int:
    from difftrain.operator.builders import Defaults, children

    jobs = _valid_jobs(args.files, args.recursive, args.profile)
    if jobs is None:
        return InvalidSpec.exit_code
    defaults = Defaults(**({"image": args.image} if args.image else {}))
    manifests = [m for job in jobs for m in children(job, args.attempt, defaults)]
    sys.stdout.write(dump_all(manifests))
    return 0


def _run(args: argparse.Namespace) -> int:
    from difftrain import local

    jobs = _valid_jobs([args.file], False, args.profile)
    if jobs is None:
        return InvalidSpec.exit_code
    if len(jobs) != 1:
        print(f"{args.file}: holds {len(jobs)} jobs; run one at a time", file=sys.stderr)
        return InvalidSpec.exit_code
    try:
        return local.run(
            local.with_nodes(jobs[0], args.nodes),
            Path(args.workdir),
            local.free_port(),
            args.metrics_port,
        )
    except InvalidSpec as error:
        print(error, file=sys.stderr)
        return error.exit_code


def _dataset_shapes(args: argparse.Namespace) -> int:
    from difftrain.shapes import write_dataset

    folder = write_dataset(Path(args.folder), args.count, args.size)
    print(f"wrote {args.count} images and captions to {folder} (images/ + captions/)")
    return 0


def _s3_settings(args: argparse.Namespace):
    """S3 settings from the command's flags over the environment's."""
    import os

    from difftrain.storage import S3Settings

    return S3Settings(
        endpoint=args.endpoint or os.environ.get("AWS_ENDPOINT_URL"),
        region=args.region or os.environ.get("AWS_REGION", "us-east-1"),
        path_style=args.path_style,
    )


def _profile_flag(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--profile",
        metavar="FILE",
        help="a DiffusionTrainingProfile to merge each job with (default: the profile a job "
        "names, from among the files)",
    )


def _manifest_arguments(command: argparse.ArgumentParser) -> None:
    _profile_flag(command)
    command.add_argument("files", nargs="+", metavar="FILE|DIR")
    command.add_argument(
        "-R", "--recursive", action="store_true", help="also read the folders' subfolders"
    )


def _s3_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("--endpoint", help="S3 endpoint (default $AWS_ENDPOINT_URL)")
    command.add_argument("--region", help="S3 region (default $AWS_REGION or us-east-1)")
    command.add_argument(
        "--path-style", action="store_true", help="path-style S3 addressing (MinIO and others)"
    )


def _sample(args: argparse.Namespace) -> int:
    import tempfile

    from difftrain import sample

    settings = _s3_settings(args)
    try:
        with tempfile.TemporaryDirectory(prefix="difftrain-sample-") as folder:
            work = Path(folder)
            model = sample.locate(args.model, settings, work, sample.cache_folder(), args.base)
            for text in args.lora:
                where, weight = sample.parse_lora(text)
                path = sample.fetch_file(where, settings, work, "--lora")
                model.loras.append(sample.Adapter(path, where, weight=weight))
            for text in args.embedding:
                where, token = sample.parse_embedding(text)
                path = sample.fetch_file(where, settings, work, "--embedding")
                model.embeddings.append(sample.Adapter(path, where, token=token))
            request = sample.Request(
                prompt=args.prompt,
                negative=args.negative,
                steps=args.steps,
                guidance=args.guidance,
                seed=args.seed,
                count=args.n,
                size=args.size,
                image=Path(args.image) if args.image else None,
                strength=args.strength,
                mask=Path(args.mask) if args.mask else None,
            )
            summary = sample.run(model, request, Path(args.output))
    except InvalidSpec as error:
        print(error, file=sys.stderr)
        return error.exit_code
    made = len(summary["images"])
    print(f"wrote {made} image(s) and samples.json to {args.output} ({summary['mode']})")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from difftrain import compare

    if len(args.outputs) < 2:
        print("compare needs at least two outputs (OUTPUT_A OUTPUT_B ...)", file=sys.stderr)
        return InvalidSpec.exit_code
    settings = _s3_settings(args)
    try:
        runs = [compare.load_run(uri, settings) for uri in args.outputs]
        if args.generate:
            prompts = args.prompt or runs[0].record.get("spec", {}).get("validation", {}).get(
                "prompts", []
            )
            if not prompts:
                print("--generate needs --prompt (the runs sample no prompts)", file=sys.stderr)
                return InvalidSpec.exit_code
            with tempfile.TemporaryDirectory(prefix="difftrain-compare-") as work:
                samples = compare.generated_rows(
                    runs,
                    prompts,
                    seed=args.seed,
                    steps=args.steps,
                    guidance=args.guidance,
                    base=args.base,
                    settings=settings,
                    workdir=Path(work),
                )
        else:
            samples = compare.sample_rows(runs)
    except InvalidSpec as error:
        print(error, file=sys.stderr)
        return error.exit_code
    numbers = compare.report(runs, samples)
    if args.json:
        print(json.dumps(numbers, indent=2))
    if args.output or not args.json:
        path = Path(args.output or "compare.html")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(compare.render_html(runs, samples, numbers), encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _operator(args: argparse.Namespace) -> int:
    from difftrain.operator.main import defaults_from_env, run

    try:
        defaults = defaults_from_env()
    except ValueError as error:
        print(f"difftrain operator: {error}", file=sys.stderr)
        return 2
    from difftrain.operator.kube import NoCredentials

    try:
        run(
            args.namespace,
            args.resync_seconds,
            args.metrics_port,
            args.health_port,
            defaults,
            args.failure_grace_seconds,
        )
    except NoCredentials as error:
        print(f"difftrain operator: {error}", file=sys.stderr)
        return 2
    return 0


def _crds(args: argparse.Namespace) -> int:
    written = render_crds()
    if args.output:
        return _writer(lambda: "---\n".join(written.values()))(args)
    for path, text in written.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


def _writer(render: Callable[[], str]) -> Callable[[argparse.Namespace], int]:
    def write(args: argparse.Namespace) -> int:
        text = render()
        if args.output == "-":
            sys.stdout.write(text)
        else:
            path = Path(args.output)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
        return 0

    return write


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difftrain", description="Train diffusion models from one Kubernetes manifest."
    )
    parser.add_argument("--version", action="version", version=f"difftrain {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate",
        help="check DiffusionTrainingJob manifests",
        description="Check manifests against the API; one line per problem, exit 2 if any. "
        "A folder stands for its .yaml, .yml and .json files (-R: its subfolders' too), in "
        "which documents of other API groups are skipped, as kubectl apply -f applies them "
        "beside the jobs; a named file must hold only DiffusionTrainingJobs and "
        "DiffusionTrainingProfiles. Each job is checked merged with its profile.",
    )
    _manifest_arguments(validate)
    validate.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    validate.set_defaults(run=_validate)

    render = commands.add_parser(
        "render",
        help="print the Kubernetes objects the operator would create",
        description="Print the ConfigMap, Service and Job the operator creates for each job "
        "in the files (or the folders' files), as multi-document YAML (a dry run).",
    )
    _manifest_arguments(render)
    render.add_argument("--attempt", type=int, default=1, help="gang attempt (default 1)")
    render.add_argument("--image", help="trainer image when the job names none")
    render.set_defaults(run=_render)

    run = commands.add_parser(
        "run",
        help="run a job on this machine",
        description="Run the job in FILE here, one local process per node, launched as its "
        "pods would be. Ctrl-C checkpoints; running again resumes.",
    )
    run.add_argument("file", metavar="FILE")
    _profile_flag(run)
    run.add_argument("--nodes", type=int, help="override spec.resources.nodes")
    run.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="node 0's Prometheus metrics port (default: a free one; every node's URL is "
        "printed at start)",
    )
    run.add_argument(
        "--workdir",
        default=".difftrain",
        help="local scratch, cache and config (default .difftrain)",
    )
    run.set_defaults(run=_run)

    dataset = commands.add_parser("dataset", help="write a built-in dataset to a folder")
    kinds = dataset.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    shapes = kinds.add_parser(
        "shapes",
        help="coloured shapes with captions (builtin:shapes)",
        description="Write the deterministic builtin:shapes dataset in the images/ + "
        "captions/ layout, e.g. to upload it to S3 and train on it like your own data.",
    )
    shapes.add_argument("folder", metavar="DIR")
    shapes.add_argument("--count", type=int, default=2048, help="images (default 2048)")
    shapes.add_argument("--size", type=int, default=64, help="side in pixels (default 64)")
    shapes.set_defaults(run=_dataset_shapes)

    compare = commands.add_parser(
        "compare",
        help="compare finished runs in an HTML report",
        description="Compare finished runs (their outputs, s3:// or file://): spec "
        "differences, loss curves, evaluation scores (the best marked) and images of the "
        "same prompt and seed side by side, in one self-contained HTML file. S3 "
        "credentials come from the environment, as for the other commands.",
    )
    compare.add_argument("outputs", nargs="+", metavar="OUTPUT")
    compare.add_argument(
        "-o", "--output", help="HTML file to write (default compare.html; none with --json)"
    )
    compare.add_argument("--json", action="store_true", help="print the numbers as JSON")
    compare.add_argument(
        "--generate",
        action="store_true",
        help="generate the images now from each run's model instead of using its samples",
    )
    compare.add_argument(
        "--prompt", action="append", default=[], help="prompt to generate (repeatable)"
    )
    compare.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    compare.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    compare.add_argument("--guidance", type=float, default=7.5, help="guidance scale")
    compare.add_argument("--base", help="base model of adapter runs stored on S3")
    _s3_flags(compare)
    compare.set_defaults(run=_compare)

    sample = commands.add_parser(
        "sample",
        help="make images with a trained model",
        description="Make images with a trained model: text-to-image, image-to-image "
        "(--image, --strength) or inpainting (--image, --mask). MODEL is a job's output or "
        "its model/ folder (s3:// or file://), a diffusers folder, or a base model "
        "(hf://, preset:, s3://, file://) with --lora and --embedding files. Writes PNGs, "
        "samples.json (prompt, seeds, settings, model digest) and, for several images, "
        "grid.png. Runs on a GPU when there is one.",
    )
    sample.add_argument("model", metavar="MODEL")
    sample.add_argument("--prompt", required=True, help="what to draw")
    sample.add_argument("--negative", default="", help="negative prompt")
    sample.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="LoRA file to apply (repeatable), with its weight (default 1)",
    )
    sample.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="FILE[:TOKEN]",
        help="Textual Inversion file (repeatable), with the token prompts use for it",
    )
    sample.add_argument("--image", help="init image: image-to-image, or inpainting with --mask")
    sample.add_argument(
        "--strength", type=float, default=0.75, help="how far from --image to go (0-1]"
    )
    sample.add_argument("--mask", help="inpainting mask (white is repainted), --image's size")
    sample.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    sample.add_argument("--guidance", type=float, default=7.5, help="guidance scale")
    sample.add_argument("--seed", type=int, default=0, help="seed of the first image")
    sample.add_argument("-n", type=int, default=1, help="images to make (seeds seed, seed+1...)")
    sample.add_argument("--size", type=int, help="image side (default: the job's resolution)")
    sample.add_argument("--base", help="base model of an adapter whose record keeps none")
    sample.add_argument("-o", "--output", default="samples", help="folder (default samples/)")
    _s3_flags(sample)
    sample.set_defaults(run=_sample)

    operator = commands.add_parser(
        "operator",
        help="run the operator",
        description="Reconcile DiffusionTrainingJobs into gangs of torchrun pods. Uses the "
        "in-cluster service account, or the current kubeconfig context.",
    )
    operator.add_argument(
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable); all namespaces when absent",
    )
    operator.add_argument(
        "--resync-seconds",
        type=float,
        default=30.0,
        help="how often every job is reconciled regardless of events",
    )
    operator.add_argument(
        "--failure-grace-seconds",
        type=float,
        default=300.0,
        help="how long a pod may wait on its image or its Secrets before the job fails",
    )
    operator.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics")
    operator.add_argument("--health-port", type=int, default=8081, help="liveness /healthz")
    operator.set_defaults(run=_operator)

    crd = commands.add_parser(
        "crd",
        help="write the CustomResourceDefinitions",
        description="Write the DiffusionTrainingJob and DiffusionTrainingProfile "
        "CustomResourceDefinitions, each to its file under crds/ (or both to one file, or "
        "to stdout with -o -, for kubectl apply -f -).",
    )
    crd.add_argument("-o", "--output", help="one file for both, - for stdout")
    crd.set_defaults(run=_crds)

    for name, path, render, what in (
        ("reference", REFERENCE_PATH, render_reference, "the API reference (Markdown)"),
        ("dashboard", DASHBOARD_PATH, render_dashboard, "the Grafana dashboard (JSON)"),
    ):
        command = commands.add_parser(name, help=f"write {what}", description=f"Write {what}.")
        command.add_argument(
            "-o", "--output", default=path, help=f"file to write, - for stdout (default {path})"
        )
        command.set_defaults(run=_writer(render))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
