"""``kubectl difftrain``: what ``kubectl get dtj`` cannot show.

kubectl runs any executable named ``kubectl-difftrain`` on the PATH for ``kubectl
difftrain ...``; the package installs one. It reads the user's kubeconfig (``KUBECONFIG``
or ``~/.kube/config``, ``--kubeconfig``, ``--context``) through the kubernetes client and
works in the context's namespace or ``-n``:

- ``status NAME``: phase and reason, attempt and restarts, progress, the last checkpoint,
  the evaluation, the outputs, and every condition with its reason and age;
- ``events NAME``: the job's Events, oldest first;
- ``logs NAME [--node N] [--attempt N] [-f] [--tail N]``: the trainer logs of the gang's
  pods (the current attempt's, or attempt N's), each line prefixed by its node;
- ``samples NAME [--step N] [-o DIR]``: the newest validation grid (or step N's) from the
  job's output, with S3 credentials from the environment as the other commands read them.
"""

import argparse
import json
import os
import sys
import threading
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


def _node(pod) -> int:
    return int((pod.metadata.annotations or {}).get(contract.COMPLETION_INDEX, -1))


def _gang(args, job: dict, core, namespace: str) -> tuple[int, list]:
    """The attempt asked for (else the current one) and its pods by node, or an error
    saying which there are."""
    attempt = args.attempt or (job.get("status") or {}).get("attempt") or 1
    selector = f"{contract.JOB_NAME_LABEL}={args.name},{contract.ATTEMPT_LABEL}={attempt}"
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    pods = sorted((p for p in pods if not p.metadata.deletion_timestamp), key=_node)
    if not pods:
        raise PluginError(
            f"{args.name} has no pods of attempt {attempt} (they are made when it starts, "
            "and go with their attempt when it restarts)"
        )
    if args.node is not None:
        chosen = [pod for pod in pods if _node(pod) == args.node]
        if not chosen:
            nodes = ", ".join(str(_node(pod)) for pod in pods)
            raise PluginError(f"--node {args.node}: attempt {attempt} has nodes {nodes}")
        pods = chosen
    return attempt, pods


def _logs(args) -> int:
    from kubernetes.client.exceptions import ApiException

    job, core, namespace = _job(args)
    _, pods = _gang(args, job, core, namespace)
    lock = threading.Lock()

    def say(node: int, line: str) -> None:
        with lock:
            print(f"[node {node}] {line}", flush=True)

    def read(pod) -> None:
        node = _node(pod)
        options = {"container": contract.TRAINER_CONTAINER, "tail_lines": args.tail}
        try:
            if not args.follow:
                text = core.read_namespaced_pod_log(pod.metadata.name, namespace, **options)
                for line in text.splitlines():
                    say(node, line)
                return
            stream = core.read_namespaced_pod_log(
                pod.metadata.name, namespace, follow=True, _preload_content=False, **options
            )
            rest = b""
            for chunk in stream.stream(4096):
                *lines, rest = (rest + chunk).split(b"\n")
                for line in lines:
                    say(node, line.decode("utf-8", "replace"))
            if rest:
                say(node, rest.decode("utf-8", "replace"))
        except ApiException as error:
            with lock:
                print(f"[node {node}] no logs: {_api_message(error)}", file=sys.stderr)

    if not args.follow:
        for pod in pods:
            read(pod)
        return 0
    readers = [threading.Thread(target=read, args=(pod,), daemon=True) for pod in pods]
    for reader in readers:
        reader.start()
    try:
        for reader in readers:
            reader.join()
    except KeyboardInterrupt:
        return 130
    return 0


def _api_message(error) -> str:
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{error.status} {error.reason}"


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
        description="DiffusionTrainingJobs beyond kubectl get: status, events, logs, samples.",
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
    logs = command("logs", "the trainer logs of the gang's pods, prefixed by node")
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("--node", type=int, help="only this node's (default every node's)")
    logs.add_argument("--attempt", type=int, help="this attempt's pods (default the current)")
    logs.add_argument("-f", "--follow", action="store_true", help="stream them as they come")
    logs.add_argument("--tail", type=int, help="only the last N lines of each")
    logs.set_defaults(run=_logs)
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
