"""A quality judge for the tiny world: how clean a render looks, from a few measurements anyone can check.

A clean render is white paper with solid inks on it: the four shape colours, or black text. Each pixel is
read as paper plus one ink (detector.read_inks), and eight measurements are taken:

    measurement      what it is                                               what raises it
    off_palette      mean distance of pixels on and around the ink (2 px)     noise, mixed or bleeding colours
                     off every paper-to-ink line (RGB units, 0-255 scale)
    edge_width       partly inked pixels per pixel of the inks' outline       blur, smearing
    specks           inked regions too small to be a shape or a character     noise, stray dots, broken shapes
    extra_parts      inked regions beyond those the prompt asks for           fragmented shapes, text on two lines
    misshapen        shapes: mean of (1 - ShapesDetector score)               broken, ragged, smeared shapes
    border_contact   text: share of the image border that text ink covers     text too large for the canvas
    width_per_char   text: box width over height, per character asked for     duplicated text
    empty            1 when no region is large enough to be a shape or glyph  a blank or washed-out image

The rating is 5 minus a penalty per measurement, each WEIGHT x (measurement - ALLOWANCE) where positive,
clipped to [1, 5]. Allowances absorb what a clean render has (anti-aliased text has some soft edges), so
ground-truth renders rate 5. Weights are set so that one clear defect (noise of std 16, a blur of sigma 1,
four stray dots, text written twice) costs one to three points (see PENALTIES), and so that the shipped
tiny model's held-out samples, ordinary generations with soft shapes and slightly mixed colours, rate
above 3: about 3.15 (shapes) and 4.6 (glyphs), where the paper's judge puts FLUX.1's own samples (3.43 on
both tasks, from its baseline's reward and corrected score). The corrected score r * (u_hat - 3) + 0.2
needs that: at a rating of 3 it ignores the reward, below 3 it counts a higher reward against a model.

Metadata helps where given: a shapes prompt's include clauses give the number of objects, a text prompt's
"text" the number of characters (one region each in this font). Without it, a text image may hold up to
three characters (the most glyphs_stream asks for) and a shapes image as many objects as it shows.
"""

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from gdro_ray.rewards.quality import QUALITY_SCALE, QualityJudge
from gdro_ray.tiny_world.detector import ShapesDetector, ink_masks, read_inks
from gdro_ray.tiny_world.shapes import SHAPE_COLORS

BLACK = (0, 0, 0)
MAX_GLYPHS = 3
# (allowance, weight): points lost = weight x max(0, measurement - allowance).
PENALTIES = {
    "off_palette": (1.0, 0.11),  # 8-bit rounding of a blend is under 1 off; noise of std 16 costs 1.1-1.4
    "edge_width": (0.9, 1.5),  # anti-aliased clean text has up to about 0.8; a blur of sigma 1 about 2
    "specks": (0.0, 0.5),
    "extra_parts": (0.0, 1.0),
    # Clean shapes lose at most 0.05 of their score; the soft, rounded shapes a small model draws about
    # 0.5 (what a 32-pixel generation looks like: free), a smear of two shapes into one blob 0.8 or more.
    "misshapen": (0.5, 3.0),
    "border_contact": (0.0, 20.0),  # a glyph cut by one edge covers about a tenth of the border
    "width_per_char": (1.35, 2.0),  # clean text 0.7-1.2; the text written twice in a row about 1.9
    "empty": (0.0, 4.0),  # nothing drawn is the worst render, however clean the paper
}


@dataclass(frozen=True)
class QualityMeasurements:
    """The measurements of one image (see the module docstring)."""

    off_palette: float
    edge_width: float
    specks: int
    extra_parts: int
    misshapen: float
    border_contact: float
    width_per_char: float
    empty: int


def quality_rating(measurements: QualityMeasurements) -> float:
    """The documented rule: 5 minus the penalties, within QUALITY_SCALE."""
    low, high = QUALITY_SCALE
    penalty = sum(
        weight * max(0.0, getattr(measurements, name) - allowance) for name, (allowance, weight) in PENALTIES.items()
    )
    return float(min(high, max(low, high - penalty)))


def shows_text(metadata: dict | None, text_pixels: int, inked_pixels: int) -> bool:
    """A text prompt's image (else a shapes one), by its metadata or else by its inks: mostly black."""
    if metadata and ("text" in metadata or "include" in metadata):
        return "text" in metadata
    return text_pixels > inked_pixels / 2


def expected_parts(metadata: dict | None) -> int | None:
    """How many inked regions the prompt asks for: characters of its text or objects of its clauses; None
    when unknown (a shapes image without metadata)."""
    if metadata and "text" in metadata:
        return max(1, len("".join(metadata["text"].split())))
    if metadata and "include" in metadata:
        return sum(clause["count"] for clause in metadata["include"])
    return None


class TinyWorldJudge(QualityJudge):
    """Rates tiny-world renders, shapes and glyphs alike, by quality_rating over QualityMeasurements."""

    def __init__(self, detector: ShapesDetector | None = None):
        self.detector = detector or ShapesDetector()
        self.ink_colors = [SHAPE_COLORS[name] for name in self.detector.color_names] + [BLACK]

    def rate(self, images: list[Image.Image], metadata: list[dict]) -> list[float]:
        if len(images) != len(metadata):
            raise ValueError(f"got {len(images)} images for {len(metadata)} metadata records")
        return [quality_rating(self.measure(image, meta)) for image, meta in zip(images, metadata)]

    def measure(self, image: Image.Image, metadata: dict | None = None) -> QualityMeasurements:
        """The measurements behind a rating, for one image and (optionally) its prompt metadata."""
        image = image.convert("RGB")
        pixels = np.asarray(image)
        reading = read_inks(pixels, self.ink_colors)
        masks = ink_masks(reading, len(self.ink_colors), self.detector.min_amount, self.detector.max_off_segment)
        inked, text = np.logical_or.reduce(masks), masks[-1]
        areas = [area for mask in masks for area in region_areas(mask)]
        parts = sum(area >= self.detector.min_area_fraction * inked.size for area in areas)
        is_text = shows_text(metadata, text.sum(), inked.sum())
        expected = expected_parts(metadata)
        if expected is None and is_text:
            expected = MAX_GLYPHS
        # Noise is everywhere, bleeding only around the ink: averaging there sees both undiluted.
        around_ink = near(inked, 2) if inked.any() else np.ones_like(inked)
        shapes = [] if is_text else self.detector.detect(image)
        return QualityMeasurements(
            off_palette=float(reading.off_segment[around_ink].mean()),
            edge_width=edge_width(reading.amount),
            specks=len(areas) - parts,
            extra_parts=0 if expected is None else max(0, parts - expected),
            misshapen=float(np.mean([1.0 - d.score for d in shapes])) if shapes else 0.0,
            border_contact=border_share(text) if is_text else 0.0,
            width_per_char=width_per_char(text, expected) if is_text and text.any() else 0.0,
            empty=int(parts == 0),
        )


def region_areas(mask: np.ndarray) -> list[int]:
    """Pixel areas of the 8-connected regions of a boolean mask."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return [int(area) for area in stats[1:count, cv2.CC_STAT_AREA]]


def edge_width(amount: np.ndarray, low: float = 0.2, high: float = 0.8) -> float:
    """Partly inked pixels (amount between low and high) per pixel of the inked regions' outline: how many
    pixels an edge takes to go from paper to ink. 0 for hard edges, under 1 for anti-aliased ones, about 2
    for a Gaussian blur of one pixel's sigma."""
    inked = (amount > 0.5).astype(np.uint8)
    interior = cv2.erode(inked, cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)), borderValue=1)
    outline = inked.astype(bool) & ~interior.astype(bool)
    return float(((amount > low) & (amount < high)).sum() / max(int(outline.sum()), 1))


def width_per_char(mask: np.ndarray, characters: int) -> float:
    """Width of the mask's bounding box over its height, per character: a bold capital is about as wide as
    it is tall, so text much wider than its characters need holds more characters than it should."""
    ys, xs = np.nonzero(mask)
    return float((xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1) / characters)


def near(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask grown by `pixels` in every direction."""
    side = 2 * pixels + 1
    return cv2.dilate(mask.astype(np.uint8), np.ones((side, side), np.uint8)).astype(bool)


def border_share(mask: np.ndarray) -> float:
    """Share of the one-pixel frame of the image that the mask covers."""
    frame = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(frame.mean())
