"""Latents and text embeddings computed once and kept: a cache keyed by content, shared
by every epoch, restart, node and job that trains on the same images with the same
autoencoder (latents) or on the same captions with the same frozen text encoders (text).

Its layout under the cache URI (spec.cache.uri, else the operator's default, else each
node's local disk)::

    v1/latents/<space>/shards/<sha256>.safetensors   many entries in one file
    v1/latents/<space>/index/<sha256>.json           the entry keys of that shard
    v1/text/<space>/...

A *space* is one model part as it runs: the digest of its weights, their dtype, the
quantization and mixed precision it runs under, and for text the family (which decides
what conditioning its encoders give). Within a space an *entry* is keyed by what goes
in: an image file's bytes with its target size, crop box and flip (stored: the latent
distribution's mean and std, so that every step still draws a sample of its own, as
without the cache), or a caption's token ids (stored: the family's conditioning
tensors). Only what is exact is served: latents of a crop that is the same every time
(a centre crop, or an image with nothing to crop at its size), never a random crop's;
text only while no text encoder trains.

A shard is named by the SHA-256 of its bytes and its index is written after it, so no
reader indexes a half-written shard; every node checks the bytes of each shard it uses
once, and a shard that does not match its name is deleted and its entries computed
again, never trained on. Two jobs filling the same entries at once both write them
(the cache is then merely larger); either copy is the same values.
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftrain import bars
from difftrain.errors import DifftrainError
from difftrain.storage import FileStore, Store

log = logging.getLogger(__name__)

LAYOUT = "v1"
SHARD_ENTRIES = 1024  # entries a filling process writes to one shard at most
SHARD_BYTES = 256 * 2**20  # ... and bytes
EXACT_EPOCHS = 2  # a run this long or shorter caches just the latents it draws
FILL_BATCH = 16  # images or captions encoded together while filling
PROGRESS_SECONDS = 30.0  # how often a filling process logs its progress


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers: names, dtypes, shapes and bytes (a
    quantized weight's inner tensors)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        parts = [tensor]
        if hasattr(tensor, "__tensor_flatten__"):  # a quantized tensor subclass
            inner = tensor.__tensor_flatten__()[0]
            parts = [getattr(tensor, part) for part in inner]
        for part in parts:
            if part is None:
                continue
            part = part.detach().cpu().reshape(-1)
            if part.stride(-1) != 1:  # a one-element view may keep a stride view() refuses
                part = part.clone(memory_format=torch.contiguous_format)
            digest.update(f"{name}:{part.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(memoryview(part.view(torch.uint8).numpy()))
    return digest.hexdigest()


def entry_key(*parts) -> str:
    """The key of an entry made from ``parts`` (JSON-able)."""
    text = json.dumps(parts, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


class Space:
    """The entries of one kind for one model part, in a store, with this node's copies
    (``mirror``) of what it read from a store elsewhere."""

    def __init__(self, store: Store, kind: str, digest: str, mirror: Path):
        self.store, self.kind, self.digest = store, kind, digest
        self.prefix = f"{LAYOUT}/{kind}/{digest[:32]}"
        self.mirror = mirror / self.prefix
        self.local = isinstance(store, FileStore)  # its files are read where they are
        self.shards: dict[str, str] = {}  # entry -> shard digest
        self._open: dict[str, tuple] = {}  # shard -> (handle, entry -> tensor names)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{self.store.uri}/{self.prefix}"

    # Finding and checking shards.

    def refresh(self) -> None:
        """Read the indexes of shards written since the last call."""
        known = set(self.shards.values())
        for key in self.store.keys(f"{self.prefix}/index"):
            shard = Path(key).stem
            if shard in known or not key.endswith(".json"):
                continue
            entries = self._index(key, shard)
            if entries is not None:
                self.shards.update(dict.fromkeys(entries, shard))
                known.add(shard)

    def _index(self, key: str, shard: str) -> list[str] | None:
        copy = self.mirror / "index" / f"{shard}.json"
        try:
            text = copy.read_text() if copy.is_file() else self.store.read_bytes(key).decode()
            entries = json.loads(text)
        except (OSError, ValueError):  # gone since the listing, or unreadable: not used
            log.warning("cache: ignoring the unreadable index %s/%s", self.store.uri, key)
            return None
        if not copy.is_file():
            _write_atomically(copy, text.encode())
        return [str(entry) for entry in entries]

    def verify(self, wanted: Iterable[str]) -> None:
        """Check the bytes of each shard holding one of ``wanted`` (once per node); a shard
        that does not match its name is deleted and its entries forgotten."""
        for shard in sorted({self.shards[e] for e in wanted if e in self.shards}):
            if not self._checked(shard):
                log.warning(
                    "cache: shard %s/%s is corrupt or incomplete (its bytes do not match "
                    "its name); deleting it and computing its entries again",
                    self,
                    f"shards/{shard}.safetensors",
                )
                self.drop(shard)

    def _checked(self, shard: str) -> bool:
        """Whether the shard's bytes match its digest, fetching it to this node first
        when the store is elsewhere."""
        path = self._path(shard)
        marker = self.mirror / "checked" / shard
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process of the node reads it
            if not self.local and not path.is_file():
                try:
                    self.store.download(self._key(shard), path)
                except FileNotFoundError:
                    return False
            try:
                tag = _tag(path)
            except OSError:
                return False
            if marker.is_file() and marker.read_text() == tag:
                return True
            if file_digest(path) != shard:
                return False
            _write_atomically(marker, tag.encode())
        return True

    def drop(self, shard: str) -> None:
        """Delete a bad shard everywhere and forget its entries."""
        self.shards = {e: s for e, s in self.shards.items() if s != shard}
        self._open.pop(shard, None)
        try:
            self.store.delete([self._key(shard), f"{self.prefix}/index/{shard}.json"])
        except Exception as error:  # another job deleted it first, or no permission
            log.warning("cache: could not delete shard %s: %s", shard, error)
        if not self.local:
            self._path(shard).unlink(missing_ok=True)
        (self.mirror / "index" / f"{shard}.json").unlink(missing_ok=True)

    def _key(self, shard: str) -> str:
        return f"{self.prefix}/shards/{shard}.safetensors"

    def _path(self, shard: str) -> Path:
        if self.local:
            return self.store.root / self._key(shard)
        return self.mirror / "shards" / f"{shard}.safetensors"

    # Reading and writing entries.

    def get(self, entry: str) -> dict[str, torch.Tensor] | None:
        """An entry's tensors by field, or None when the cache does not hold it."""
        shard = self.shards.get(entry)
        if shard is None:
            return None
        with self._lock:
            if shard not in self._open:
                from safetensors import safe_open

                handle = safe_open(self._path(shard), framework="pt")
                names: dict[str, list[str]] = {}
                for name in handle.keys():  # noqa: SIM118 (no iterator of its own)
                    names.setdefault(name.split("/", 1)[0], []).append(name)
                self._open[shard] = (handle, names)
            handle, names = self._open[shard]
            return {n.split("/", 1)[1]: handle.get_tensor(n) for n in names.get(entry, [])}

    def write(self, entries: dict[str, dict[str, torch.Tensor]]) -> str:
        """Store ``entries`` (entry -> field -> tensor) as one shard; its digest."""
        from safetensors.torch import save

        tensors = {
            f"{entry}/{name}": tensor.detach().to("cpu", copy=True).contiguous()
            for entry, fields in entries.items()
            for name, tensor in fields.items()
        }
        data = save(tensors, metadata={"layout": LAYOUT, "kind": self.kind})
        shard = hashlib.sha256(data).hexdigest()
        if not self.local:  # this node has it already
            _write_atomically(self._path(shard), data)
        self.store.write_bytes(self._key(shard), data)
        index = json.dumps(sorted(entries)).encode()
        self.store.write_bytes(f"{self.prefix}/index/{shard}.json", index)  # after the shard
        _write_atomically(self.mirror / "checked" / shard, _tag(self._path(shard)).encode())
        self.shards.update(dict.fromkeys(entries, shard))
        return shard


def _tag(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    temporary.write_bytes(data)
    temporary.replace(path)


@dataclass
class Fill:
    """What one process computes and stores: ``todo`` entries, made ``FILL_BATCH`` at a
    time by ``compute`` (a list of work items -> one dict of fields per item)."""

    space: Space
    todo: dict[str, object]  # entry -> what compute needs to make it
    compute: Callable[[list], list[dict[str, torch.Tensor]]]
    group: Callable[[object], object] = lambda item: None  # items encoded together share this
    done: int = field(default=0)

    def run(self, report: Callable[[int], None]) -> None:
        pending: dict[str, dict] = {}
        size = 0
        started = last = time.monotonic()
        groups: dict[object, list[str]] = {}
        for entry, item in self.todo.items():
            groups.setdefault(self.group(item), []).append(entry)
        for entries in groups.values():
            for start in range(0, len(entries), FILL_BATCH):
                chunk = entries[start : start + FILL_BATCH]
                for entry, fields in zip(
                    chunk, self.compute([self.todo[e] for e in chunk]), strict=True
                ):
                    pending[entry] = fields
                    size += sum(t.numel() * t.element_size() for t in fields.values())
                self.done += len(chunk)
                if len(pending) >= SHARD_ENTRIES or size >= SHARD_BYTES:
                    self.space.write(pending)
                    pending, size = {}, 0
                report(self.done)
                now = time.monotonic()
                if now - last >= PROGRESS_SECONDS:
                    last = now
                    rate = self.done / (now - started)
                    log.info(
                        "cache: %s %d/%d computed (%.1f/s)",
                        self.space.kind,
                        self.done,
                        len(self.todo),
                        rate,
                    )
        if pending:
            self.space.write(pending)


@dataclass
class Features:
    """What a stage serves from the cache: entries by the sample they are for."""

    latents: Space | None = None
    text: Space | None = None
    latent_entries: dict = field(default_factory=dict)  # (index, size, flip) -> entry
    text_entries: dict = field(default_factory=dict)  # caption -> entry

    def latents_of(self, index: int, plan) -> dict | None:
        """The cached latent moments (``mean``, ``std``) of a sample, if held."""
        entry = self.latent_entries.get((index, plan.size, plan.flip))
        if entry is None or self.latents is None or plan.box != entry[1]:
            return None  # a random crop other than the cached one
        return self.latents.get(entry[0])

    def text_of(self, caption: str) -> dict | None:
        """The cached text conditioning of a caption, if held."""
        entry = self.text_entries.get(caption)
        return None if entry is None or self.text is None else self.text.get(entry)


def cache_store(spec, settings, paths) -> tuple[Store, bool]:
    """The cache's store, and whether every node shares it (spec.cache.uri, else the
    operator's default in ``DIFFTRAIN_SHARED_CACHE_URI``); else each node's own disk."""
    from difftrain.storage import open_store

    uri = spec.cache.uri or os.environ.get("DIFFTRAIN_SHARED_CACHE_URI")
    if uri:
        return open_store(uri, settings), True
    return FileStore(paths.cache / "features"), False


@contextlib.contextmanager
def serving(run, stage, steps: int, report: Callable[..., None]) -> Iterator[None]:
    """The diffusion ``stage`` (``steps`` long) trains on the cache in the block: filled
    first, then served by the run's dataset; afterwards the log says what the steps
    encoded themselves. Other stages train on pixels."""
    if stage.name != "diffusion":
        yield
        return
    micro_batches = steps * run.spec.training.gradient_accumulation_steps
    run.dataset.features = prepare(run, stage.trains_text, micro_batches, report)
    try:
        yield
    finally:
        run.dataset.features = None
    log.info(
        "the steps encoded %d images and %d captions (the cache served the rest)",
        stage.encoded["images"],
        stage.encoded["captions"],
    )


def prepare(
    run, trains_text: bool, micro_batches: int, report: Callable[..., None]
) -> Features | None:
    """The cache's entries for the diffusion stage of ``run`` (``micro_batches`` long),
    the missing ones computed first, each process its share (every process calls it,
    with the model on its device);
    ``report`` takes the gauges cache_entries, cache_entries_to_compute and
    cache_entries_computed. None when spec.cache turns both kinds off."""
    from difftrain.storage import S3Settings

    spec = run.spec
    if not (spec.cache.latents or spec.cache.text_embeddings):
        return None
    store, shared = cache_store(spec, S3Settings.from_spec(spec.storage), run.paths)
    mirror = run.paths.cache / "features-copies"
    features = Features()
    fills, drawn = [], _drawn(run, micro_batches)
    if spec.cache.latents:
        features.latents, todo = _latent_entries(run, store, mirror, features, drawn)
        fills.append((features.latents, todo, _latent_computer(run), lambda item: item[1]))
    templates = run.dataset.transform.templates
    if spec.cache.text_embeddings and not trains_text and not templates:
        features.text, todo = _text_entries(run, store, mirror, features, drawn)
        fills.append((features.text, todo, _text_computer(run), lambda item: None))
    wanted = sum(len(todo) for _, todo, _, _ in fills)
    to_compute = {}
    for space, todo, _, _ in fills:
        missing = list(todo)
        with _unless_unusable(space, "read"):
            space.refresh()
            space.verify(todo)
            missing = [e for e in todo if e not in space.shards]
        to_compute[space.kind] = _share(run, shared, missing)
    mine = sum(len(entries) for entries in to_compute.values())
    report(cache_entries=wanted, cache_entries_to_compute=mine, cache_entries_computed=0)
    done = 0
    for space, todo, compute, group in fills:
        entries = to_compute[space.kind]
        found = len(todo) - len(entries) if run.accelerator.num_processes == 1 else None
        log.info(
            "cache: %d %s entries at %s%s; computing %d here",
            len(todo),
            space.kind,
            space,
            f", {found} found" if found is not None else "",
            len(entries),
        )
        fill = Fill(space, {e: todo[e] for e in entries}, compute, group)
        shown = bars.bar(len(entries), f"caching {space.kind}", "entry")

        def filled(count: int, before=done, shown=shown) -> None:
            report(cache_entries_computed=before + count)
            shown.update(count - shown.n)

        with _unless_unusable(space, "write"), shown:
            fill.run(filled)
        done += fill.done
    run.waiting.barrier("cache filled")
    for space, todo, _, _ in fills:
        with _unless_unusable(space, "read"):
            space.refresh()  # the other processes' shards
            space.verify(todo)
        absent = sum(e not in space.shards for e in todo)
        if absent:
            log.warning(
                "cache: %d of %d %s entries are not in the cache; they are computed at each step",
                absent,
                len(todo),
                space.kind,
            )
    return features


@contextlib.contextmanager
def _unless_unusable(space: Space, doing: str) -> Iterator[None]:
    """Go on without what the block would have done when the cache's store cannot be
    read or written (a warning naming it: training is then slower, not wrong)."""
    try:
        yield
    except (DifftrainError, OSError) as error:
        log.warning(
            "cache: cannot %s %s (%s); the steps encode what it lacks instead (check "
            "spec.cache.uri, or the chart's trainer.cacheUri)",
            doing,
            space,
            error,
        )


def _share(run, shared: bool, missing: list[str]) -> list[str]:
    """This process's share of the entries missing anywhere: of all processes' when the
    cache is shared, of its node's processes' when each node has its own."""
    from difftrain.trainer.setup import gather_from_all

    accelerator = run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world > 1 else 1
    views = gather_from_all(accelerator, missing)
    if shared:
        peers = range(world)
        position, count = rank, world
    else:  # the processes of this node
        node = rank // local
        peers = range(node * local, min(world, (node + 1) * local))
        position, count = rank - node * local, len(peers)
    every = sorted(set().union(*(views[peer] for peer in peers)))
    return every[position::count]


def _latent_entries(run, store, mirror: Path, features: Features, drawn) -> tuple[Space, dict]:
    """The latents space of the run's VAE and the entries the run serves from it: each
    (example, size, flip) it draws whose crop is the same every time (module docstring)."""
    from difftrain.trainer import data

    dataset, vae = run.dataset, run.components.vae
    digest = entry_key(
        "latents", weights_digest(vae), str(vae.dtype), run.spec.training.mixed_precision
    )
    space = Space(store, "latents", digest, mirror)
    transform = dataset.transform
    todo, wanted = {}, drawn and drawn[0]
    if wanted is None:  # a long run: every variant of every image
        flips = (False, True) if transform.random_flip else (False,)
        wanted = {(i, size, flip) for i, size in run.batches.variants() for flip in flips}
    centred = {}
    for index, size, _ in wanted:
        source = dataset.source_size(index)
        if transform.center_crop or data.fixed_crop(source, size):
            centred[index, size] = data.cover_crop(source, size, None)[0]
    variants = sorted(v for v in wanted if v[:2] in centred)
    images = _image_digests(run, sorted({index for index, _, _ in variants}))
    for index, size, flip in variants:
        box = centred[index, size]
        entry = entry_key(images[index], size, box, flip)
        features.latent_entries[(index, size, flip)] = (entry, box)
        todo[entry] = (index, size, box, flip)
    return space, todo


def _drawn(run, micro_batches: int) -> set | None:
    """The (example, size, flip) of every sample the run draws (of all processes), and
    their captions; None when the run is longer than :data:`EXACT_EPOCHS` epochs (it
    then draws about every variant and caption)."""
    import math
    import random

    from difftrain.trainer.setup import gather_from_all

    batches, dataset = run.batches, run.dataset
    epochs = math.ceil(micro_batches / batches.batches_per_epoch)
    if epochs > EXACT_EPOCHS:
        return None
    drawn, captions, count = set(), set(), 0
    for epoch in range(epochs):
        for keys in batches.epoch(epoch):
            if count == micro_batches:
                break
            count += 1
            for index, seed, width, height in keys:
                source = dataset.source_size(index)
                plan, chosen = dataset.transform.plan(source, random.Random(seed), (width, height))
                drawn.add((index, plan.size, plan.flip))
                captions.add(dataset.examples[index].caption if chosen is None else chosen)
    views = gather_from_all(run.accelerator, (drawn, captions))
    return set().union(*(v[0] for v in views)), set().union(*(v[1] for v in views))


def _image_digests(run, indices: list[int]) -> dict[int, str]:
    """SHA-256 of the image files of examples ``indices``, each process hashing a share
    (and none a file whose size and mtime are as when it last did)."""
    from difftrain.trainer import data
    from difftrain.trainer.setup import gather_from_all

    accelerator = run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    paths = [run.dataset.examples[index].image for index in indices]
    folders = sorted({str(path.parent) for path in paths})
    records = run.paths.cache / "digests" / entry_key(folders)[:16]
    mine = data.file_facts(paths[rank::world], records, f"rank{rank}", file_digest)
    shares = gather_from_all(accelerator, mine)
    return {index: shares[i % world][i // world] for i, index in enumerate(indices)}


def _latent_computer(run) -> Callable[[list], list[dict]]:
    from concurrent.futures import ThreadPoolExecutor

    from difftrain.trainer import data

    components, accelerator, dataset = run.components, run.accelerator, run.dataset

    def compute(items: list) -> list[dict]:
        def render(item):
            index, size, box, flip = item
            plan = data.Plan(size, box, (0, 0), flip, (0, 0))
            return dataset.transform.render(dataset.examples[index].image, plan)

        with ThreadPoolExecutor(4, thread_name_prefix="difftrain-cache") as pool:
            pixels = torch.stack(list(pool.map(render, items)))
        pixels = pixels.to(accelerator.device, dtype=components.vae.dtype)
        made = []
        for image in pixels:  # one at a time: see _text_computer
            with accelerator.autocast(), torch.no_grad():  # as in the training step
                mean, std = components.family.latent_moments(components, image[None])
            made.append({"mean": mean[0], "std": std[0]})
        return made

    return compute


def _text_entries(run, store, mirror: Path, features: Features, drawn) -> tuple[Space, dict]:
    """The text space of the run's frozen encoders and an entry for each caption the
    run draws (of a long run: every caption, and the empty one when captions drop)."""
    from difftrain.trainer.conditioning import token_ids

    components, spec = run.components, run.spec
    digest = entry_key(
        "text",
        components.family.name,
        [weights_digest(encoder) for encoder in components.text_encoders],
        [str(encoder.dtype) for encoder in components.text_encoders],
        spec.model.quantization,
        spec.training.mixed_precision,
    )
    space = Space(store, "text", digest, mirror)
    if drawn is not None:
        captions = drawn[1]
    else:
        captions = {example.caption for example in run.dataset.examples}
        if run.dataset.transform.caption_dropout:
            captions.add("")
    captions = sorted(captions)
    ids = token_ids(components, captions)
    todo = {}
    for row, caption in enumerate(captions):
        entry = entry_key([tokens[row].tolist() for tokens in ids])
        features.text_entries[caption] = entry
        todo[entry] = caption
    return space, todo


def _text_computer(run) -> Callable[[list], list[dict]]:
    from difftrain.trainer.conditioning import token_ids

    components, accelerator = run.components, run.accelerator

    def compute(captions: list[str]) -> list[dict]:
        """Each caption's conditioning, computed alone: a kernel's result may depend on
        the batch it is in, and an entry's value must not depend on which others were
        missing when it was made (two jobs, or a job and its rerun, train bit for bit
        alike whoever filled the cache)."""
        made = []
        for caption in captions:
            ids = [tokens.to(accelerator.device) for tokens in token_ids(components, [caption])]
            with accelerator.autocast(), torch.no_grad():  # as in the training step
                text = components.family.encode_text(components, ids)
            made.append({name: value[0] for name, value in text.items()})
        return made

    return compute
