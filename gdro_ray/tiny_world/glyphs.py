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
# OCR-task templates: ten surfaces in four phrasings. Forty templates give 480 single-letter prompts,
# enough for the world to keep its length mix among distinct prompts, held-out ones included.
GLYPH_SURFACES = ("sign", "poster", "label", "banner", "sticker", "card", "board", "flag", "badge", "page")
GLYPH_TEMPLATES = tuple(
    phrasing.format(surface=surface, text="{text}")
    for phrasing in ('a {surface} that says "{text}"', 'a {surface} reading "{text}"',
                     'a {surface} with the word "{text}"', 'the text "{text}" on a {surface}')
    for surface in GLYPH_SURFACES
)  # fmt: skip
GLYPH_LENGTHS = (1, 1, 2, 2, 3)  # text lengths, drawn uniformly: 1 or 2 characters more often than 3


def random_glyph_prompt(rng: random.Random, lengths: tuple[int, ...] = GLYPH_LENGTHS) -> PromptRecord:
    """A random text, its length drawn from ``lengths``, in a random template."""
    return _glyph_prompt(rng, rng.choice(lengths))


def _glyph_prompt(rng: random.Random, length: int) -> PromptRecord:
    text = "".join(rng.choice(GLYPH_ALPHABET) for _ in range(length))
    return make_record("ocr", rng.choice(GLYPH_TEMPLATES).format(text=text), {"text": text})


def glyphs_stream(seed: int) -> Iterator[PromptRecord]:
    """Distinct glyph prompts whose text lengths follow GLYPH_LENGTHS (2 : 2 : 1), until a length runs
    out of prompts: the 480 single-letter ones end the world at about 1,200 prompts. Drawing distinct
    prompts without a length quota would use up the short texts first and leave the held-out split
    mostly three-letter texts."""
    rng, seen = random.Random(seed), set()
    left = {length: len(GLYPH_ALPHABET) ** length * len(GLYPH_TEMPLATES) for length in set(GLYPH_LENGTHS)}
    while True:
        length = rng.choice(GLYPH_LENGTHS)
        if left[length] == 0:
            return
        record = next(r for r in iter(lambda: _glyph_prompt(rng, length), None) if r.prompt not in seen)
        seen.add(record.prompt)
        left[length] -= 1
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
