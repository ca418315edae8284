"""Tiny evaluator models in the file formats users provide: an InceptionV3 weights file
in torch-fidelity's format (random weights, the real architecture) and a CLIP model
folder as transformers writes it (a few thousand parameters, the offline tokenizer)."""

from pathlib import Path

import torch


def write_inception(path: Path, seed: int = 0) -> Path:
    """An InceptionV3 state dict as torch-fidelity loads it, with random weights: its
    convolutions He-initialised so the pool features keep a useful spread."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # built here, not loaded
            return None

    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    torch.manual_seed(seed)
    model = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    empty.unlink()
    return path


def write_clip(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny CLIPModel and its processor, saved as from_pretrained reads them."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from difftrain.trainer.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **layers,
            "num_attention_heads": 2,
            "vocab_size": tokenizer.vocab_size,
            "max_position_embeddings": tokenizer.model_max_length,
        },
        vision_config={
            **layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def all_scores(shapes_folder: Path, inception: Path, clip: Path, **settings) -> dict:
    """A ``spec.evaluation`` asking for all three scores at test sizes: FID on 64
    Inception features against the shapes images, the CLIP score, and the held-out loss;
    ``settings`` (numImages, everySteps, a validationLoss of its own, ...) over it."""
    return {
        "prompts": ["a red circle", "a blue square"],
        "fid": {
            "referenceUri": f"file://{shapes_folder}/images",
            "weightsUri": f"file://{inception}",
            "features": 64,
        },
        "clipScore": {"modelUri": f"file://{clip}"},
        "validationLoss": {"fraction": 0.125, "timesteps": 2},
        **settings,
    }
