"""Fine-tuning: the whole denoiser trains; the export is the base pipeline with it."""

from difftrain.trainer.methods import Method, register, whole_denoiser
from difftrain.trainer.trainable import Trainable


class Finetune(Method):
    name = "finetune"

    def can_shard(self, spec) -> bool:
        return True

    def prepare(self, components, spec):
        return Trainable(whole_denoiser(components))


register(Finetune())
