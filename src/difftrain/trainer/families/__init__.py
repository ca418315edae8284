"""Model families: what differs between the architectures the trainer trains.

A family is one module here that defines a :class:`Family` subclass and registers an
instance of it. The rest of the trainer asks the family of the loaded model (the
``family`` of its :class:`~difftrain.trainer.models.Components`) and never names one:
how it is detected in a model folder, which components it has, how its denoiser is
called, what it learns to predict, which pipeline samples it, where LoRA goes, and how
its adapters and embeddings are laid out in exported files. DEVELOPERS.md lists what a
new family writes.
"""

from typing import ClassVar

from difftrain.errors import InvalidSpec
from difftrain.trainer.registry import Registry


class Family:
    """The behaviour of one model family; subclasses fill in what their models need."""

    name: str  # as spec.model.architecture and the model card call it
    denoiser = "unet"  # the component that predicts the noise
    denoiser_title = "UNet"  # what the model card calls it
    text_encoders = 1  # how many text encoders (and tokenizers) the models have
    priority = 0  # families with a higher one are asked first (the more specific ones)
    presets: tuple[str, ...] = ()  # the built-in tiny models of the family (preset:NAME)
    refused_methods: ClassVar[dict[str, str]] = {}  # spec.method values it does not train, and why

    # What a model folder holds, and the model built from it.

    def matches(self, index: dict, configs: dict[str, dict]) -> bool:
        """Whether a model with this ``model_index.json`` and these component configs
        (by component name) is of this family."""
        raise NotImplementedError

    def encoder_names(self) -> list[str]:
        """The text encoders' component names: text_encoder, text_encoder_2, ..."""
        return [encoder_name(index) for index in range(self.text_encoders)]

    def component_names(self) -> list[str]:
        """Every component a model of the family must have."""
        return [self.denoiser, "vae", "scheduler", *self.encoder_names(), *self.tokenizer_names()]

    def tokenizer_names(self) -> list[str]:
        """The tokenizers' component names, in the text encoders' order."""
        return [name.replace("text_encoder", "tokenizer") for name in self.encoder_names()]

    def check_fit(self, components) -> None:
        """Refuse component configs that cannot work together (a new model's)."""

    def check(self, spec, components) -> None:
        """Refuse, once the model is loaded, job settings its family cannot train with."""

    def set_schedule(self, training, components) -> None:
        """Apply the job's settings of the noise schedule (spec.training) to the loaded
        model's scheduler, which training, samples and the export then share."""

    def blocks(self, denoiser) -> list:
        """The denoiser's blocks, each a unit of its own when it is sharded (fsdp)."""
        raise NotImplementedError

    def pixel_multiple(self, components) -> int:
        """What every training side (resolution, buckets) must be a multiple of."""
        return 2 ** (len(components.vae.config.block_out_channels) - 1)

    def preset_parts(self, name: str) -> dict:
        """The components of preset ``name`` other than the VAE and the scheduler
        (presets.py makes those, and seeds the random weights), by component name."""
        raise NotImplementedError

    # Training.

    def prediction_type(self, scheduler) -> str:
        """What the denoiser predicts, by the model's scheduler."""
        return scheduler.config.prediction_type

    def latent_moments(self, components, pixels) -> tuple:
        """The mean and standard deviation of the VAE's latent distribution for pixels
        in [-1, 1] (what the cache keeps of an image)."""
        distribution = components.vae.encode(pixels).latent_dist
        return distribution.mean, distribution.std

    def scale_latents(self, components, sampled):
        """The latents the denoiser learns on, from a sample of the VAE's distribution."""
        raise NotImplementedError

    def objective(self, components, training, device):
        """The training objective: a callable (latents, generator) -> ``loss.Noised``."""
        raise NotImplementedError

    def token_length(self, index: int, tokenizer) -> int:
        """Tokens per caption for tokenizer ``index`` (its own maximum by default)."""
        return tokenizer.model_max_length

    def trained_encoders(self) -> list[str]:
        """The text encoders that train when a job trains them (all by default)."""
        return self.encoder_names()

    def encode_text(self, components, ids: list) -> dict:
        """The denoiser's text conditioning for token ids (one tensor per tokenizer)."""
        raise NotImplementedError

    def conditioning(self, components, batch: dict, training, device) -> dict:
        """The denoiser's conditioning besides the text: from the batch itself (SDXL's
        sizes) or from spec.training ``training`` (Flux's guidance)."""
        return {}

    def predict(self, denoiser, noisy, timesteps, text: dict, extra: dict):
        """The denoiser's output for ``noisy`` at ``timesteps``."""
        raise NotImplementedError

    # Sampling and export.

    def pipeline(self, parts: dict):
        """A sampling pipeline over ``parts`` (components by name, tokenizers included)."""
        raise NotImplementedError

    def sampler(self, config: dict):
        """The scheduler validation samples are drawn with, from the training one's config."""
        raise NotImplementedError

    def sampling_options(self, components) -> dict:
        """Arguments of the family's pipeline call beside the prompt, size and steps."""
        return {}

    def export_formats(self, lora: bool) -> list[str]:
        """The export formats of a job that names none."""
        return ["diffusers", "kohya"] if lora else ["diffusers"]

    def lora_targets(self, requested: list[str]) -> list[str]:
        """Where LoRA goes in the denoiser for spec.lora.targetModules ``requested``
        (whose default names the attention projections of diffusers' models: a family
        may add its own, such as a second stream's)."""
        raise NotImplementedError

    def text_encoder_lora_targets(self) -> list[str]:
        """Where LoRA goes in the text encoders."""
        raise NotImplementedError

    def save_lora(self, folder, states: dict, metadata: dict) -> None:
        """Write diffusers' LoRA file (``pytorch_lora_weights.safetensors``) from peft's
        state dicts and adapter configs (``metadata``), by component name."""
        raise NotImplementedError

    def kohya_state(self, states: dict, trainable, dtype) -> dict:
        """LoRA in kohya's layout (ComfyUI, A1111/Forge), from peft's state dicts by
        component name."""
        from difftrain.trainer import adapters

        return adapters.kohya_state(states, trainable, self, dtype)

    # The prefix of the denoiser's keys in a LyCORIS file (LoKr, LoHa): kohya's, over
    # the UNet's diffusers names, which ComfyUI, A1111 and sd-scripts read.
    lycoris_prefix = "lora_unet"

    def kohya_component(self, prefix: str) -> str:
        """The component a kohya key's prefix (``unet``, ``te1``, ...) belongs to."""
        raise NotImplementedError

    # Whether the original Stable Diffusion checkpoint layout holds the family's models
    # (output format singleFile); those that do place their text encoders there.
    single_file = False

    def single_file_encoders(self, pipeline) -> list[tuple]:
        """(text encoder, key prefix, singlefile.CLIP or OPEN_CLIP) for each encoder."""
        raise NotImplementedError

    def embedding_file(self, token: str, vectors: dict) -> dict:
        """Textual Inversion's file: learned vectors by encoder name, keyed as loaders
        of the family's embeddings read them."""
        raise NotImplementedError

    def embedding_usage(self) -> str:
        """How a user loads the family's embeddings (for the model card)."""
        return 'pipe.load_textual_inversion("model/learned_embeds.safetensors")'


def encoder_name(index: int) -> str:
    """The component name of text encoder ``index``: text_encoder, text_encoder_2."""
    return "text_encoder" + (f"_{index + 1}" if index else "")


def kohya_encoder_prefix(part: str) -> str:
    """kohya's prefix of a text encoder's keys: ``lora_te1`` for ``text_encoder``,
    ``lora_te2`` for ``text_encoder_2``, as diffusers' kohya converter writes them."""
    return "lora_te" + (part.rsplit("_", 1)[1] if part[-1].isdigit() else "1")


def kohya_encoder(prefix: str) -> str:
    """The text encoder a kohya key's prefix (``te1``, ``te2``) names: the inverse of
    :func:`kohya_encoder_prefix`."""
    return encoder_name(int(prefix.removeprefix("te")) - 1)


_FAMILIES = Registry(__name__)
register = _FAMILIES.add


def all_families() -> list[Family]:
    """Every family, the most specific first (the order detection asks them in)."""
    return sorted(_FAMILIES.parts().values(), key=lambda family: -family.priority)


def named(name: str) -> Family:
    return _FAMILIES.parts()[name]


def detect(index: dict, configs: dict[str, dict], where: str) -> Family:
    """The family of the model whose ``model_index.json`` is ``index`` and whose
    components have ``configs``; InvalidSpec naming what it is when no family is."""
    for family in all_families():
        if family.matches(index, configs):
            return family
    known = ", ".join(family.name for family in all_families())
    raise InvalidSpec(
        f"spec.model.base: {where} is a {index.get('_class_name', 'model')} this trainer "
        f"does not train; supported families: {known}"
    )


def of_preset(name: str) -> Family:
    for family in all_families():
        if name in family.presets:
            return family
    raise ValueError(f"unknown preset {name!r}")
