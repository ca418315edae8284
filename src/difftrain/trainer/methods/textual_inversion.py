"""Textual Inversion: new token embeddings for a concept, the rest of the model frozen.

The placeholder token (and, for N vectors, ``TOKEN_1`` ... ``TOKEN_{N-1}``) is added to
every tokenizer, its embedding rows start as copies of the initializer token's, and only
those rows train: after each optimiser step every other row is put back exactly, so the
text encoders stay bit-identical apart from the new rows (weight decay and momentum
never leak into them). Captions are prompt templates with the placeholder in them.
The result is ``learned_embeds.safetensors`` in the layout loaders of the model's
family read (families/: ``{TOKEN: (N, D)}`` for one text encoder).
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from difftrain.errors import InvalidSpec
from difftrain.trainer.methods import Method, register
from difftrain.trainer.trainable import Trainable

FILE = "learned_embeds.safetensors"

TEMPLATES = {
    "object": (
        "a photo of a {}",
        "a picture of a {}",
        "an image of the {}",
        "a close-up photo of a {}",
        "a photo of the {}",
        "a cropped photo of a {}",
        "a bright photo of a {}",
        "a dark photo of the {}",
        "a small {}",
        "a large {}",
        "a rendering of a {}",
        "a good photo of the {}",
    ),
    "style": (
        "a painting in the style of {}",
        "a picture in the style of {}",
        "an image in the style of {}",
        "a rendering in the style of {}",
        "a drawing in the style of {}",
        "a small painting in the style of {}",
        "a large painting in the style of {}",
        "a cropped painting in the style of {}",
        "art in the style of {}",
        "a good picture in the style of {}",
    ),
}


def tokens(settings) -> list[str]:
    """The tokens added for ``spec.textualInversion``: one per vector."""
    first = settings.placeholder_token
    return [first] + [f"{first}_{index}" for index in range(1, settings.vectors)]


def subject(settings) -> str:
    """What stands in the captions for the concept: all its tokens, in order."""
    return " ".join(tokens(settings))


class EmbeddingRows(Trainable):
    """The new rows of each text encoder's token embedding, and nothing else.

    Checkpoints hold just these rows (not the whole vocabulary), and :meth:`after_step`
    restores every other row after each optimiser step.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], rows: list[int]):
        super().__init__(modules)
        self.rows = rows
        self.frozen = {
            name: module.get_input_embeddings().weight.detach().clone()
            for name, module in modules.items()
        }

    def _weights(self, name: str) -> torch.nn.Parameter:
        return self.modules[name].get_input_embeddings().weight

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.token_embedding.rows": self._weights(name).detach()[self.rows]
            for name in self.modules
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.state_dict()):
            raise ValueError(
                f"checkpoint holds other weights than this job trains: {sorted(state)}"
            )
        with torch.no_grad():
            for name in self.modules:
                self._weights(name)[self.rows] = state[f"{name}.token_embedding.rows"].to(
                    self._weights(name).dtype
                )

    def after_step(self) -> None:
        with torch.no_grad():
            for name in self.modules:
                weights = self._weights(name)
                frozen = self.frozen[name]
                if frozen.device != weights.device or frozen.dtype != weights.dtype:
                    frozen = self.frozen[name] = frozen.to(weights)  # once, not every step
                learned = weights[self.rows].clone()
                weights.copy_(frozen)
                weights[self.rows] = learned

    def embeddings(self) -> dict[str, torch.Tensor]:
        """The learned vectors ``(N, D)`` of each text encoder, by component name."""
        return {
            name: self._weights(name).detach()[self.rows].float().cpu() for name in self.modules
        }


def prepare(components, settings) -> EmbeddingRows:
    """Add the placeholder tokens, initialise their rows, and freeze everything else."""
    new = tokens(settings)
    rows = None
    modules = {}
    names = components.family.encoder_names()
    parts = zip(names, components.tokenizers, components.text_encoders, strict=True)
    for name, tokenizer, encoder in parts:
        vocabulary = tokenizer.get_vocab()
        taken = [
            token
            for token in new
            if token in vocabulary or len(tokenizer.encode(token, add_special_tokens=False)) == 1
        ]
        if taken:
            raise InvalidSpec(
                f"spec.textualInversion.placeholderToken: {taken[0]!r} is already in the "
                "tokenizer's vocabulary; choose a token that is not a word, e.g. <my-concept>"
            )
        start = tokenizer.encode(settings.initializer_token, add_special_tokens=False)
        if len(start) != 1:
            pieces = tokenizer.convert_ids_to_tokens(start)
            raise InvalidSpec(
                f"spec.textualInversion.initializerToken: {settings.initializer_token!r} is "
                f"{len(start)} tokens ({' '.join(pieces)}), not one; choose a single-token word "
                "close to the concept"
            )
        tokenizer.add_tokens(new)
        ids = tokenizer.convert_tokens_to_ids(new)
        if rows is not None and ids != rows:
            raise InvalidSpec("spec.model.base: the tokenizers disagree on their vocabularies")
        rows = ids
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weights = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weights[ids] = weights[start[0]].clone()
        encoder.requires_grad_(False)
        weights.requires_grad_(True)
        modules[name] = encoder
    return EmbeddingRows(modules, rows)


def export(trainable: EmbeddingRows, family, settings, folder: Path, dtype) -> Path:
    """Write ``learned_embeds.safetensors`` for the loaders (see the module's docstring)."""
    vectors = {name: vector.to(dtype) for name, vector in trainable.embeddings().items()}
    state = family.embedding_file(settings.placeholder_token, vectors)
    path = folder / FILE
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


class TextualInversion(Method):
    name = "textualInversion"

    def captions(self, spec):
        concept = spec.textual_inversion
        return TEMPLATES[concept.template], subject(concept)

    def prepare(self, components, spec):
        components.denoiser.requires_grad_(False)
        return prepare(components, spec.textual_inversion)

    def export(self, stage, folder, formats, dtype):
        family = stage.components.family
        export(stage.trainable, family, stage.config.spec.textual_inversion, folder, dtype)

    def export_bytes(self, stage, formats, itemsize):
        return stage.trainable.trained_count() * itemsize * len(formats)

    def card(self, spec, facts, family):
        settings = spec.textual_inversion
        row = ("Placeholder / vectors", f"{settings.placeholder_token} / {settings.vectors}")
        return [row], family.embedding_usage()


register(TextualInversion())
