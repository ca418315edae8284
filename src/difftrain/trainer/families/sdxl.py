"""SDXL: a UNet conditioned on two CLIP text encoders (penultimate hidden states side by
side, the second's pooled projection) and on six size and crop numbers."""

import torch

from difftrain.trainer.families import register
from difftrain.trainer.families.unet import UNetFamily

# Textual Inversion files of SDXL hold one tensor per text encoder, under these keys
# (the layout SDXL embedding files share across tools).
EMBEDDING_KEYS = ("clip_l", "clip_g")


class StableDiffusionXL(UNetFamily):
    name = "sdxl"
    text_encoders = 2
    priority = 1
    presets = ("tiny-sdxl",)

    def matches(self, index: dict, configs: dict[str, dict]) -> bool:
        unet = configs.get("unet") or {}
        return (
            "XL" in index.get("_class_name", "") or unet.get("addition_embed_type") == "text_time"
        )

    def encode_text(self, components, ids: list) -> dict:
        """Both encoders' penultimate hidden states concatenated ``(B, L, D1 + D2)``, and
        the second encoder's pooled projection ``(B, P)`` as ``text_embeds``."""
        states, pooled = [], None
        for tokens, encoder in zip(ids, components.text_encoders, strict=True):
            output = encoder(tokens, output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's (projected) pooled embedding
        return {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": pooled}

    def conditioning(self, components, batch: dict, training, device) -> dict:
        """SDXL's micro-conditioning ``(B, 6)``: original (h, w), crop (top, left) in the
        resized image, target (h, w), as in SDXL's training."""
        sizes = (batch["original_sizes"], batch["crops_top_left"], batch["target_sizes"])
        return {"time_ids": torch.cat(sizes, dim=1).float().to(device)}

    def predict(self, denoiser, noisy, timesteps, text: dict, extra: dict):
        added = {"text_embeds": text["text_embeds"], "time_ids": extra["time_ids"]}
        states = text["encoder_hidden_states"]
        return denoiser(
            noisy, timesteps, encoder_hidden_states=states, added_cond_kwargs=added
        ).sample

    single_file = True

    def single_file_encoders(self, pipeline) -> list[tuple]:
        from difftrain.trainer import singlefile

        return [
            (pipeline.text_encoder, "conditioner.embedders.0.transformer.", singlefile.CLIP),
            (pipeline.text_encoder_2, "conditioner.embedders.1.model.", singlefile.OPEN_CLIP),
        ]

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def pipeline(self, parts: dict):
        return self.pipeline_class()(**parts)

    def preset_parts(self, name: str) -> dict:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from difftrain.trainer import presets

        tokenizer = presets.tokenizer()
        unet = {
            **presets.UNET,
            "attention_head_dim": [2, 4],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "transformer_layers_per_block": [1, 1],
            # six size/crop numbers embedded with 8 dims each, plus the pooled text embedding
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "cross_attention_dim": 64,  # both text encoders' hidden states, concatenated
        }
        parts = {
            "text_encoder": CLIPTextModel(presets.text_config(tokenizer)),
            "text_encoder_2": CLIPTextModelWithProjection(presets.text_config(tokenizer, 32)),
            "tokenizer": tokenizer,
            "tokenizer_2": presets.tokenizer(),
            "unet": UNet2DConditionModel(**unet),
        }
        return parts

    def embedding_file(self, token: str, vectors: dict) -> dict:
        return dict(zip(EMBEDDING_KEYS, vectors.values(), strict=True))

    def embedding_usage(self) -> str:
        return (
            'pipe.load_textual_inversion(embeds["clip_l"], token=TOKEN, ...)` for the first '
            'text encoder and `embeds["clip_g"]` with `text_encoder_2`/`tokenizer_2'
        )


register(StableDiffusionXL())
