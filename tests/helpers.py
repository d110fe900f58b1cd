"""Helpers shared by the tests: small synthetic images and the keypoint vocabulary of the tiny model."""

import numpy as np
from PIL import Image

KEYPOINT_NAMES = ["left eye", "right eye", "nose", "tail tip", "front left paw"]


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
