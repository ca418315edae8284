"""Read manifest files: YAML documents with the line of every field, for error reports."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from difftrain.api.job import DiffusionTrainingJob
from difftrain.api.profile import PROFILE_GROUPS, PROFILE_KIND, PROFILE_PLURAL, is_profile, named
from difftrain.api.validation import Loc, Problem, applied, validate_job, validate_profile
from difftrain.errors import InvalidSpec


@dataclass
class Document:
    """One YAML document of a manifest file."""

    source: str
    data: Any
    node: yaml.Node

    def line_of(self, loc: Loc) -> int:
        """The 1-based line of the deepest field along ``loc`` that exists in the file."""
        node, line = self.node, self.node.start_mark.line
        for part in loc:
            found = _child(node, part)
            if found is None:
                break
            marker, node = found
            line = marker.start_mark.line
        return line + 1


def _child(node: yaml.Node, part: str | int) -> tuple[yaml.Node, yaml.Node] | None:
    """(the node whose line names ``part``, the node holding its value), if present."""
    if isinstance(node, yaml.MappingNode):
        return next(((key, value) for key, value in node.value if key.value == part), None)
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part], node.value[part]
    return None


def read_documents(text: str, source: str) -> list[Document]:
    """Parse every non-empty YAML document in ``text``.

    Raises :class:`InvalidSpec` naming the file and line for malformed YAML and for
    duplicate keys (which YAML parsers otherwise resolve silently, last one wins).
    """
    try:
        nodes = [node for node in yaml.compose_all(text, Loader=yaml.SafeLoader) if node]
        for node in nodes:
            _reject_duplicate_keys(node, source)
        return [Document(source, _construct(node), node) for node in nodes]
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise InvalidSpec(f"{where}: invalid YAML: {error.problem or error.context}") from None


def _construct(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _reject_duplicate_keys(node: yaml.Node, source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.value in seen:
                raise InvalidSpec(
                    f"{source}:{key.start_mark.line + 1}: duplicate key '{key.value}'; "
                    "keep one of them"
                )
            seen.add(key.value)
            _reject_duplicate_keys(value, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _reject_duplicate_keys(item, source)


# What ``kubectl apply -f`` reads in a folder.
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
GROUP = "difftrain.io"


@dataclass
class Manifest:
    """A file to read: named on the command line (every document must be a job), or found
    in a folder (documents of other API groups are skipped, as ``kubectl apply`` applies
    them beside the jobs)."""

    path: Path
    in_folder: bool = False


def expand(names: list[str], recursive: bool = False) -> list[Manifest]:
    """The manifest files ``names`` stand for: a file as it is, a folder's ``.yaml``,
    ``.yml`` and ``.json`` files in name order (and its subfolders' with ``recursive``)."""
    found = []
    for name in names:
        path = Path(name)
        if not path.is_dir():
            found.append(Manifest(path))
            continue
        pattern = "**/*" if recursive else "*"
        files = sorted(p for p in path.glob(pattern) if p.suffix in MANIFEST_SUFFIXES)
        found += [Manifest(file, in_folder=True) for file in files if file.is_file()]
    return found


def _ours(data: Any) -> bool:
    """Whether a document belongs to difftrain's API group (or names no group at all)."""
    if not isinstance(data, dict) or not isinstance(data.get("apiVersion"), str):
        return True  # validated, so that what is wrong with it is said
    return data["apiVersion"].split("/")[0] == GROUP


def _documents(path: Path, in_folder: bool, notes: list[str]) -> tuple[list[Document], list[str]]:
    """The documents of one file that are difftrain's, and its problems (the file is read
    and parsed once). A file found in a folder may hold other kinds: they are skipped, and
    a file without a job or profile gets a line in ``notes``."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return [], [f"{source}: cannot read: {error}"]
    try:
        documents = read_documents(text, source)
    except InvalidSpec as error:
        return [], [str(error)]
    if not documents:
        return [], [f"{source}: no YAML documents found"]
    if in_folder:
        documents = [document for document in documents if _ours(document.data)]
        if not documents:
            notes.append(f"{source}: no DiffusionTrainingJob; skipped")
    return documents, []


@dataclass
class _Profile:
    data: dict
    source: str  # FILE:LINE


def _profiles(documents: list[Document]) -> tuple[dict[str, _Profile], list[str]]:
    """The valid profiles among ``documents`` by name, and the problems of the others."""
    found, lines = {}, []
    for document in documents:
        profile, problems = validate_profile(document.data)
        lines += [_located(document, problem) for problem in problems]
        if profile is not None:
            source = f"{document.source}:{document.line_of(())}"
            found[profile.metadata.name] = _Profile(document.data, source)
    return found, lines


def read_jobs(
    manifests: list[Manifest],
    notes: list[str],
    profile: Path | None = None,
    need_profiles: bool = False,
) -> tuple[list[DiffusionTrainingJob], list[str]]:
    """The jobs in ``manifests``, and one ``FILE:LINE: field: problem`` line per problem.

    A job is checked as it runs: merged with its profile, ``profile`` (a file holding one
    DiffusionTrainingProfile) when given, else the profile it names from among the files.
    A job naming a profile none of them defines is checked on its own fields, with a line
    in ``notes``; with ``need_profiles`` (render, run), that is a problem instead."""
    documents, lines = [], []
    for manifest in manifests:
        found, said = _documents(manifest.path, manifest.in_folder, notes)
        documents += found
        lines += said
    known, said = _profiles([d for d in documents if is_profile(d.data)])
    lines += said
    given = None
    if profile is not None:
        found, said = _documents(profile, False, notes)
        mine, said = _profiles(found) if not said else ({}, said)
        lines += said
        if not said and len(mine) != 1:
            lines.append(f"{profile}: --profile needs a file with one {PROFILE_KIND}")
        given = next(iter(mine.values())) if len(mine) == 1 else None
        if given is None:
            return [], lines
    jobs = []
    for document in documents:
        if is_profile(document.data):
            continue
        data, wanted = document.data, named(document.data)
        chosen = given or (known.get(wanted) if wanted else None)
        if chosen is not None:
            data, problems = applied(data, chosen.data, chosen.source)
            if problems:
                lines += [_located(document, problem) for problem in problems]
                continue
        elif wanted and need_profiles:
            lines.append(
                _located(
                    document,
                    Problem(
                        ("spec", "profile"),
                        f"names profile '{wanted}': pass its manifest with --profile FILE "
                        f"(kubectl get {PROFILE_PLURAL} {wanted} -o yaml > FILE)",
                    ),
                )
            )
            continue
        elif wanted:
            notes.append(
                f"{document.source}:{document.line_of(('spec', 'profile'))}: spec.profile "
                f"names '{wanted}', which none of the files defines; checked without it"
            )
        job, problems = validate_job(data)
        lines += [_located(document, _after(problem, chosen)) for problem in problems]
        if job is not None:
            jobs.append(job)
    return jobs, lines


def _after(problem: Problem, profile: _Profile | None) -> Problem:
    """``problem``, saying that the profile's fields took part when they may have."""
    if profile is None or problem.loc[:1] != ("spec",) or len(problem.loc) < 2:
        return problem
    if problem.loc[1] not in PROFILE_GROUPS:
        return problem
    return Problem(problem.loc, f"{problem.message} (merged with the profile at {profile.source})")


def _located(document: Document, problem: Problem) -> str:
    return f"{document.source}:{document.line_of(problem.loc)}: {problem}"
