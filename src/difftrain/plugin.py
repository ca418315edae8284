"""``kubectl difftrain``: what ``kubectl get dtj`` cannot show.

kubectl runs any executable named ``kubectl-difftrain`` on the PATH for ``kubectl
difftrain ...``; the package installs one. It reads the user's kubeconfig (``KUBECONFIG``
or ``~/.kube/config``, ``--kubeconfig``, ``--context``) through the kubernetes client and
works in the context's namespace or ``-n``:

- ``status NAME``: phase and reason, attempt and restarts, progress, the last checkpoint,
  the evaluation, the outputs, and every condition with its reason and age;
- ``events NAME``: the job's Events, oldest first;
- ``samples NAME [--step N] [-o DIR]``: the newest validation grid (or step N's) from the
  job's output, with S3 credentials from the environment as the other commands read them.
"""

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from difftrain import contract
from difftrain.api import profile
from difftrain.api.crd import PLURAL
from difftrain.api.job import API_VERSION
from difftrain.errors import DifftrainError, InvalidSpec

GROUP, VERSION = API_VERSION.split("/")


class PluginError(Exception):
    """What to tell the user, in one line."""


def _clients(args):
    from kubernetes import client, config

    try:
        config.load_kube_config(config_file=args.kubeconfig, context=args.context)
        contexts, current = config.list_kube_config_contexts(config_file=args.kubeconfig)
    except (config.ConfigException, OSError) as error:
        raise PluginError(f"cannot use the kubeconfig: {error}") from None
    if args.context:
        current = next((c for c in contexts if c["name"] == args.context), current)
    namespace = args.namespace or (current.get("context") or {}).get("namespace") or "default"
    return client.CustomObjectsApi(), client.CoreV1Api(), namespace


def _job(args) -> tuple[dict, object, str]:
    from kubernetes.client.exceptions import ApiException

    custom, core, namespace = _clients(args)
    try:
        job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, args.name)
    except ApiException as error:
        if error.status == 404:
            raise PluginError(
                f'diffusiontrainingjob "{args.name}" not found in namespace {namespace}'
            ) from None
        raise PluginError(f"the API server answered {error.status}: {error.reason}") from None
    return job, core, namespace


def _age(stamp: str | None, now: datetime) -> str:
    if not stamp:
        return "-"
    seconds = int((now - datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds())
    return contract.human_duration(max(seconds, 0))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def status_text(job: dict, now: datetime) -> str:
    """``status NAME``'s report of ``job``."""
    metadata, status = job["metadata"], job.get("status") or {}
    lines = [f"Name:        {metadata['name']} (namespace {metadata.get('namespace', '')})"]
    phase = status.get("phase") or "not seen by the operator yet"
    reason = f" ({status['reason']})" if status.get("reason") else ""
    lines.append(f"Phase:       {phase}{reason}")
    lines.append(
        f"Attempt:     {status.get('attempt', 1)}, restarts {status.get('restarts', 0)}, "
        f"preemptions {status.get('preemptions', 0)}"
    )
    wanted, kept = profile.named(job), status.get("profile")
    if kept:
        lines.append(f"Profile:     {kept['name']} (generation {kept.get('generation', '-')})")
    elif wanted:
        lines.append(f"Profile:     {wanted} (not taken yet)")
    progress = status.get("progress")
    if progress:
        parts = [f"step {progress['step']}/{progress['totalSteps']} ({progress['percent']}%)"]
        if progress.get("loss") is not None:
            parts.append(f"loss {progress['loss']:.4f}")
        if progress.get("imagesPerSecond") is not None:
            parts.append(f"{progress['imagesPerSecond']:.1f} images/s")
        if progress.get("eta"):
            parts.append(f"ETA {progress['eta']}")
        parts.append(f"seen {_age(progress.get('lastSeenTime'), now)} ago")
        lines.append("Progress:    " + ", ".join(parts))
    checkpoint = status.get("lastCheckpoint")
    if checkpoint:
        lines.append(
            f"Checkpoint:  step {checkpoint['step']}, {_age(checkpoint.get('time'), now)} ago, "
            f"{checkpoint['uri']}"
        )
    scores = status.get("evaluation")
    if scores:
        named = [("fid", "FID"), ("clipScore", "CLIP"), ("validationLoss", "validation loss")]
        said = [f"{label} {scores[key]:.4f}" for key, label in named if key in scores]
        lines.append(f"Evaluation:  step {scores['step']}: " + ", ".join(said))
    outputs = status.get("outputs") or {}
    for key, label in (("model", "Model"), ("registryVersion", "Registered")):
        if outputs.get(key):
            lines.append(f"{label + ':':<12} {outputs[key]}")
    if outputs.get("samples"):
        lines.append(f"Samples:     {outputs['samples'][-1]}")
    conditions = status.get("conditions") or []
    if conditions:
        rows = [["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]]
        for condition in conditions:
            rows.append(
                [
                    condition["type"],
                    condition["status"],
                    condition.get("reason", ""),
                    _age(condition.get("lastTransitionTime"), now),
                    condition.get("message", ""),
                ]
            )
        lines += ["Conditions:", _indent(_table(rows))]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _status(args) -> int:
    job, _, _ = _job(args)
    print(status_text(job, datetime.now(UTC)))
    return 0


def _events(args) -> int:
    job, core, namespace = _job(args)
    uid = job["metadata"]["uid"]
    found = core.list_namespaced_event(namespace, field_selector=f"involvedObject.uid={uid}").items
    if not found:
        print(f"no events for {args.name}")
        return 0

    def when(event):
        stamp = event.last_timestamp or event.event_time or event.first_timestamp
        return stamp or datetime.min.replace(tzinfo=UTC)

    now = datetime.now(UTC)
    rows = [["LAST SEEN", "TYPE", "REASON", "MESSAGE"]]
    for event in sorted(found, key=when):
        seen = when(event)
        age = contract.human_duration(max(int((now - seen).total_seconds()), 0))
        rows.append([age, event.type or "", event.reason or "", event.message or ""])
    print(_table(rows))
    return 0


def _samples(args) -> int:
    from difftrain.storage import S3Settings, open_store

    job, _, _ = _job(args)
    kept = (job.get("status") or {}).get("profile") or {}
    spec = profile.merge(job, kept.get("spec") or {})["spec"]  # storage may be the profile's
    storage = spec.get("storage") or {}
    settings = S3Settings(
        endpoint=args.endpoint or os.environ.get("AWS_ENDPOINT_URL") or storage.get("endpoint"),
        region=storage.get("region") or "us-east-1",
        path_style=bool(storage.get("pathStyle")),
    )
    output = open_store(spec["output"]["uri"].rstrip("/"), settings)
    steps = contract.sample_steps(output.keys(contract.SAMPLES), "grid.png")
    if not steps:
        raise PluginError(f"{output.uri}: no samples yet (samples/step-N/grid.png)")
    step = args.step if args.step is not None else steps[-1]
    if step not in steps:
        raise PluginError(
            f"--step {step}: no samples at that step; there are samples at steps "
            + ", ".join(str(s) for s in steps)
        )
    folder = contract.samples_prefix(step)
    target = Path(args.output) / f"{args.name}-{folder.split('/')[-1]}-grid.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    output.download(f"{folder}/grid.png", target)
    print(f"wrote {target} (step {step} of {len(steps)} sampled steps)")
    return 0


def _kube_flags(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "-n", "--namespace", default=default, help="namespace (default: the context's)"
    )
    parser.add_argument(
        "--kubeconfig", default=default, help="kubeconfig file (default $KUBECONFIG)"
    )
    parser.add_argument(
        "--context", default=default, help="kubeconfig context (default the current one)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl difftrain",
        description="DiffusionTrainingJobs beyond kubectl get: status, events, samples.",
    )
    _kube_flags(parser, None)
    # The same flags after the command too (kubectl difftrain status NAME -n NS).
    common = argparse.ArgumentParser(add_help=False)
    _kube_flags(common, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str):
        return commands.add_parser(name, help=help, parents=[common])

    status = command("status", "phase, progress, checkpoint, outputs, conditions")
    status.add_argument("name", metavar="NAME")
    status.set_defaults(run=_status)
    events = command("events", "the job's events, oldest first")
    events.add_argument("name", metavar="NAME")
    events.set_defaults(run=_events)
    samples = command("samples", "download the newest grid of samples")
    samples.add_argument("name", metavar="NAME")
    samples.add_argument("--step", type=int, help="the samples of this step (default newest)")
    samples.add_argument("-o", "--output", default=".", help="folder (default .)")
    samples.add_argument(
        "--endpoint",
        help="S3 endpoint (default $AWS_ENDPOINT_URL, else the job's spec.storage.endpoint)",
    )
    samples.set_defaults(run=_samples)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PluginError, InvalidSpec, DifftrainError) as error:
        print(f"kubectl difftrain: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
