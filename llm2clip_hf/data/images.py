"""Image preprocessing for training without torchvision: RandomResizedCrop (bicubic) and the tower family's
normalisation (OpenAI CLIP's for EVA02 and CLIP towers, SigLIP's for SigLIP towers)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..modeling.processing_llm2clip import image_processor_for


def load_image(value: Any) -> Image.Image:
    """An RGB PIL image from a PIL image, a path, or a datasets ``{"bytes", "path"}`` dict."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        import io

        image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    else:
        raise TypeError(f"Cannot read an image from {type(value).__name__}; give a PIL image, a path or image bytes.")
    return image.convert("RGB")


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.9, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(left, top, right, bottom)``: 10 tries, then a center crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def normalize(image: Image.Image, mean: Any, std: Any) -> torch.Tensor:
    """``(3, H, W)`` float tensor scaled to [0, 1] and normalised with ``mean`` and ``std`` (per channel)."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class CLIPImageTransform:
    """Training: RandomResizedCrop(scale 0.9-1.0, bicubic) + the family's normalisation; evaluation (or
    ``augment=False``): the model's processor (CLIP: bicubic resize of the short side and center crop; SigLIP:
    resize to the square)."""

    def __init__(self, vision_config: Any, augment: bool = True) -> None:
        self.image_size = vision_config.image_size
        self.augment = augment
        self.eval_processor = image_processor_for(vision_config)

    def __call__(self, image: Any, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = load_image(image)
        if not self.augment:
            return self.eval_processor(image, return_tensors="pt")["pixel_values"][0]
        if rng is None:
            raise ValueError("Augmented transforms need a random generator.")
        box = random_resized_crop_box(image.width, image.height, rng)
        crop = image.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)
        return normalize(crop, self.eval_processor.image_mean, self.eval_processor.image_std)
