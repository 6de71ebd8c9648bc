"""OCR reward speed with text detection at the image's own size (the default, detection "image") against
RapidOCR's own default (detection "enlarged-736"), which enlarges every image's shorter side to 736 px.

Both read the same glyph images, upscaled to the reward's 256 px: ground-truth renders, and the tiny
model's samples of held-out glyph prompts (20 Euler steps, a seed per image). Printed: milliseconds per
image, the mean reward, and the share of images whose reward is the same under both.

    python benchmarks/ocr_reading.py --renders 150 --prompts 48 --images-per-prompt 2
"""

import argparse
import random
import time

import numpy as np
import torch
from PIL import Image

from gdro_ray.evaluate import generate_images, heldout_seeds
from gdro_ray.models import load_flow_model
from gdro_ray.profiles import profile_for
from gdro_ray.rewards.ocr import OCRReward, RapidOCREngine, ocr_score, ocr_target, upscale_to_min_side
from gdro_ray.tiny_world.glyphs import GLYPH_LENGTHS, random_glyph_prompt, render_glyphs


def glyph_images(renders: int, prompts: int, images_per_prompt: int) -> dict[str, tuple[list[Image.Image], list[str]]]:
    rng = random.Random(0)
    records = [random_glyph_prompt(rng, GLYPH_LENGTHS) for _ in range(renders)]
    truth = [render_glyphs(record.metadata["text"], rng) for record in records]
    tiny = profile_for("tiny")
    heldout = tiny.prompts("ocr", split="heldout", num_prompts=prompts, seed=0)
    rows = generate_images(load_flow_model(tiny.weights, device="cpu"), heldout,
                           heldout_seeds(len(heldout), images_per_prompt), tiny.sampler)
    return {"ground-truth renders": (truth, [record.prompt for record in records]),
            "tiny model samples": ([image for row in rows for image in row],
                                   [p.prompt for p in heldout for _ in range(images_per_prompt)])}


def read(engine: RapidOCREngine, images: list[Image.Image], prompts: list[str]) -> tuple[np.ndarray, float]:
    """The OCR reward of each image (as OCRReward scores it) and the seconds per image."""
    min_side = OCRReward().min_side
    started = time.perf_counter()
    rewards = [ocr_score(engine.read(upscale_to_min_side(image, min_side)), ocr_target(prompt))
               for image, prompt in zip(images, prompts, strict=True)]
    return np.array(rewards), (time.perf_counter() - started) / len(images)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--renders", type=int, default=150)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--images-per-prompt", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)

    default, ours = RapidOCREngine(detection="enlarged-736"), RapidOCREngine(detection="image")
    print(f"{'':22}{'engine':>20}{'ms/image':>10}{'reward':>8}{'same reward':>13}")
    for name, (images, prompts) in glyph_images(args.renders, args.prompts, args.images_per_prompt).items():
        slow_rewards, slow = read(default, images, prompts)
        fast_rewards, fast = read(ours, images, prompts)
        same = np.mean(slow_rewards == fast_rewards)
        print(f"{name:22}{'RapidOCR default':>20}{slow * 1000:>10.0f}{slow_rewards.mean():>8.3f}{'':>13}")
        print(f"{'':22}{'own size (ours)':>20}{fast * 1000:>10.0f}{fast_rewards.mean():>8.3f}{same:>13.3f}")
        print(f"{'':22}ratio: {slow / fast:.2f}x images per second ({len(images)} images)")


if __name__ == "__main__":
    main()
