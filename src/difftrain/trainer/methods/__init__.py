"""Training methods: what each trains, on which examples, with which loss, in which
stages, and how it exports.

A method is one module here that defines a :class:`Method` subclass and registers an
instance of it under its ``spec.method`` name. The loop asks the job's method and never
compares ``spec.method``. DEVELOPERS.md lists what a new method writes.
"""

from difftrain.api.spec import DiffusionTrainingJobSpec
from difftrain.errors import InvalidSpec
from difftrain.trainer import loss, sharding
from difftrain.trainer.registry import Registry
from difftrain.trainer.trainable import Trainable

# The stages a job's steps can go through (stages.py builds them), in order.
DIFFUSION = "diffusion"
AUTOENCODER = "autoencoder"


class Method:
    """The behaviour of one method; subclasses override what differs from fine-tuning
    a diffusion model on captioned images."""

    name: str  # the spec.method value

    def check(self, spec: DiffusionTrainingJobSpec) -> None:
        """Refuse, before any work, settings this method cannot do."""

    def can_shard(self, spec) -> bool:
        """Whether it trains a whole denoiser and nothing else, as ``strategy: fsdp``
        shards (sharding.py)."""
        return False

    # The model and the data.

    def needs_weights(self, spec) -> bool:
        """Whether the base model's weights are needed (or only its configs)."""
        return True

    def components(self, folder, spec, seed: int):
        """The model to train, from the base model in ``folder``."""
        from difftrain.trainer import models

        return models.load_components(folder, spec.model)

    def captions(self, spec) -> tuple[tuple[str, ...], str]:
        """Caption templates and the subject put in them (none: the dataset's captions)."""
        return (), ""

    def examples(self, spec, examples: list) -> list:
        """The training examples made of the dataset's."""
        return examples

    def extra_examples(self, setup, examples: list, batches):
        """Examples trained beside the dataset's, and the batches that draw them:
        ``(examples, batches, facts)``; ``setup`` gives what making them needs."""
        return examples, batches, {}

    # Training.

    def stages(self, spec) -> list[str]:
        return [DIFFUSION]

    def prepare(self, components, spec) -> Trainable:
        """Freeze and adapt ``components``; the modules that train."""
        raise NotImplementedError

    def loss(self, spec, prediction, target, weights):
        """The batch's loss."""
        return loss.diffusion_loss(prediction, target, weights)

    # Export.

    def export(self, stage, folder, formats: list[str], dtype) -> None:
        """Write the trained model into ``folder`` (a diffusers pipeline by default)."""
        from difftrain.trainer import export

        export.export_pipeline(stage, stage.final_modules(), folder, formats, dtype)

    def export_bytes(self, stage, formats: list[str], itemsize: int) -> int:
        """About how large the exported files are."""
        return whole_model_bytes(stage.components, formats, itemsize)

    def card(self, spec, facts: dict, family) -> tuple[list[tuple[str, object]], str]:
        """The model card's rows about the method, and how to load the model."""
        return [], 'DiffusionPipeline.from_pretrained("model/")'


_METHODS = Registry(__name__)
register = _METHODS.add


def for_spec(spec: DiffusionTrainingJobSpec) -> Method:
    """The job's method, after refusing what the trainer cannot do yet."""
    known = _METHODS.parts()
    if spec.method not in known:
        raise InvalidSpec(
            f"spec.method: {spec.method} is not supported by this trainer version; "
            f"use {', '.join(sorted(known))}"
        )
    method = known[spec.method]
    sharding.check(spec, method)
    method.check(spec)
    return method


def whole_model_bytes(components, formats: list[str], itemsize: int) -> int:
    """About how large a whole pipeline's files are: once, and again as a single file."""
    modules = [components.denoiser, components.vae, *components.text_encoders]
    copies = 1 + ("singleFile" in formats)
    return sum(p.numel() for m in modules for p in m.parameters()) * itemsize * copies


def whole_text_encoders(components, modules: dict) -> None:
    """Train the family's trainable text encoders whole, beside ``modules``."""
    family = components.family
    trained = family.trained_encoders()
    for name, encoder in zip(family.encoder_names(), components.text_encoders, strict=True):
        if name in trained:
            encoder.requires_grad_(True)
            modules[name] = encoder


def whole_denoiser(components) -> dict:
    """The denoiser, trained whole."""
    components.denoiser.requires_grad_(True)
    return {components.family.denoiser: components.denoiser}
