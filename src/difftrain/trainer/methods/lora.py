"""LoRA: low-rank adapters on the frozen denoiser (and, when asked, text encoders)."""

from difftrain.trainer import adapters, export
from difftrain.trainer.methods import Method, register


class Lora(Method):
    name = "lora"

    def prepare(self, components, spec):
        return adapters.add(components, spec, adapters.settings_of(spec).train_text_encoder)

    def export(self, stage, folder, formats, dtype):
        naming = export.naming(stage)
        adapters.export(stage.components, stage.trainable, formats, folder, dtype, naming)

    def export_bytes(self, stage, formats, itemsize):
        return adapters.export_bytes(stage, formats, itemsize)

    def card(self, spec, facts, family):
        return [adapters.card_row(spec)], adapters.usage(spec, family)


register(Lora())
