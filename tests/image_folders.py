"""Tiny ImageNet-style class folders for tests: ``root/<class>/<i>.png`` of seeded random RGB pixels.
A module of its own (not conftest.py), so that its name is unique when the whole suite is collected."""

import numpy as np
from PIL import Image


def write_random_image_folder(root, classes, per_class: int, height: int, width: int, seed: int = 0):
    """``per_class`` random ``height`` x ``width`` RGB PNGs in each class folder of ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root
