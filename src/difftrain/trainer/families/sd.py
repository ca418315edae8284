"""Stable Diffusion 1.x and 2.x: a UNet conditioned on one CLIP text encoder's last
hidden state; epsilon or v-prediction."""

from difftrain.trainer.families import register
from difftrain.trainer.families.unet import UNetFamily


class StableDiffusion(UNetFamily):
    name = "sd"
    presets = ("tiny-sd",)

    def matches(self, index: dict, configs: dict[str, dict]) -> bool:
        return "unet" in configs  # any other UNet model: the least specific family

    def encode_text(self, components, ids: list) -> dict:
        """The text encoder's last hidden state ``(B, L, D)``."""
        return {"encoder_hidden_states": components.text_encoders[0](ids[0])[0]}

    single_file = True

    def single_file_encoders(self, pipeline) -> list[tuple]:
        from difftrain.trainer import singlefile

        encoder = pipeline.text_encoder
        if singlefile.open_clip(encoder):  # SD 2.x
            return [(encoder, "cond_stage_model.model.", singlefile.OPEN_CLIP)]
        return [(encoder, "cond_stage_model.transformer.", singlefile.CLIP)]

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def pipeline(self, parts: dict):
        return self.pipeline_class()(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )

    def preset_parts(self, name: str) -> dict:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        from difftrain.trainer import presets

        tokenizer = presets.tokenizer()
        parts = {
            "text_encoder": CLIPTextModel(presets.text_config(tokenizer)),
            "tokenizer": tokenizer,
            "unet": UNet2DConditionModel(**presets.UNET),
        }
        return parts

    def embedding_file(self, token: str, vectors: dict) -> dict:
        """``{TOKEN: (N, D)}``, as ``load_textual_inversion`` reads it."""
        (only,) = vectors.values()
        return {token: only}


register(StableDiffusion())
