"""Glyphs: short text (1-3 characters) rendered large on 32x32 images, with OCR-task prompts.

The alphabet leaves out characters an OCR engine confuses at this size (O/0, I/1, S/5, ...), so a
correct render always reads back correctly and a wrong one is the model's fault.
"""

import random
from collections.abc import Iterator
from functools import lru_cache

from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from gdro_ray.data.prompts import PromptRecord, make_record

IMAGE_SIZE = 32
# Twelve letters: few enough that a tiny model pretrained for an hour on a CPU learns each one.
GLYPH_ALPHABET = "ACEHKMNPRTXY"
GLYPH_TEMPLATES = (
    'a sign that says "{text}"',
    'the text "{text}" in bold letters',
    'a poster with the word "{text}"',
    'a label reading "{text}"',
)


GLYPH_LENGTHS = (1, 1, 2, 2, 3)  # text lengths, drawn uniformly: 1 or 2 characters more often than 3


def random_glyph_prompt(rng: random.Random, lengths: tuple[int, ...] = GLYPH_LENGTHS) -> PromptRecord:
    """A random text, its length drawn from ``lengths``, in a random template."""
    text = "".join(rng.choice(GLYPH_ALPHABET) for _ in range(rng.choice(lengths)))
    return make_record("ocr", rng.choice(GLYPH_TEMPLATES).format(text=text), {"text": text})


def glyphs_stream(seed: int) -> Iterator[PromptRecord]:
    """Distinct glyph prompts, until the world (about 7,500 prompts) runs out."""
    rng, seen, misses = random.Random(seed), set(), 0
    while misses < 1000:
        record = random_glyph_prompt(rng)
        if record.prompt in seen:
            misses += 1
            continue
        seen.add(record.prompt)
        misses = 0
        yield record


@lru_cache(maxsize=8)
def _font(pixels: int) -> ImageFont.FreeTypeFont:
    # DejaVu Sans Bold ships inside matplotlib: the same font on every machine, no download.
    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold"))
    return ImageFont.truetype(path, pixels)


def render_glyphs(text: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Black bold text, as large as fits, centred with a pixel of jitter, on white."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(int(size * 0.9 / max(len(text), 1.6)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (size - (right - left)) / 2 - left + rng.randint(-1, 1)
    y = (size - (bottom - top)) / 2 - top + rng.randint(-1, 1)
    draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return image
