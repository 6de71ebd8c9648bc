"""A pixel-statistics reward: the mean intensity of an image, in [0, 1].

It needs no model, so it scores a randomly initialised tiny FLUX meaningfully: a smoke-test reward
(`--reward '{"name": "brightness"}'`, and the training tests), where OCR and GenEval would score every
image of such a model 0.
"""

import numpy as np
from PIL import Image

from gdro_ray.rewards.base import Reward, RewardResult


class BrightnessReward(Reward):
    name = "brightness"

    def score(self, images: list[Image.Image], metadata: list[dict]) -> list[RewardResult]:
        return [RewardResult(float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255)) for image in images]
