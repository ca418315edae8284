"""Training from scratch (method full): a new model of the base's architecture (or the
spec's inline configs) with random weights, except the parts ``full.reuse`` keeps. The
VAE trains first in a stage of its own (autoencoder.py) unless it is reused; then the
denoiser and the text encoders. The export is the whole new pipeline."""

from difftrain.trainer import export, methods, models, sampling
from difftrain.trainer.methods import Method, register, whole_denoiser, whole_text_encoders
from difftrain.trainer.trainable import Trainable


class Full(Method):
    name = "full"

    def needs_weights(self, spec):
        return bool(spec.full_settings.reuse)  # a new model needs the base's configs alone

    def components(self, folder, spec, seed):
        return models.new_components(folder, spec.model, spec.full_settings.reuse, seed)

    def stages(self, spec):
        if "vae" in spec.full_settings.reuse:
            return [methods.DIFFUSION]
        return [methods.AUTOENCODER, methods.DIFFUSION]

    def prepare(self, components, spec):
        modules = whole_denoiser(components)
        if "textEncoders" not in spec.full_settings.reuse:
            whole_text_encoders(components, modules)  # a new model's text encoders learn too
        return Trainable(modules)

    def export(self, stage, folder, formats, dtype):
        pipeline = sampling.pipeline_for(stage.components, stage.final_modules())
        family = stage.components.family
        export.save_pipeline(pipeline, family, folder, formats, dtype, **export.naming(stage))

    def card(self, spec, facts, family):
        reused = spec.full_settings.reuse
        rows = [("Trained from scratch", _from_scratch(reused, family.denoiser_title))]
        if "vae" not in reused:
            rows.append(("Autoencoder stage steps", spec.full_settings.autoencoder.steps))
        return rows, 'DiffusionPipeline.from_pretrained("model/")'


def _from_scratch(reused: list[str], denoiser: str) -> str:
    named = (("textEncoders", "text encoders"), ("vae", "VAE"))
    parts = [denoiser] + [name for key, name in named if key not in reused]
    kept = f"; {' and '.join(reused)} from the base" if reused else ""
    return ", ".join(parts) + kept


register(Full())
