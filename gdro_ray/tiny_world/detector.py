"""A GenEval detector for the shapes world: colour segmentation and contour geometry with OpenCV, no model.

Every pixel is read as white paper with some amount of one ink on it (a point on the segment from white
to that ink's colour, plus whatever lies off the segment). Pixels more than half inked, and not too far
off the segment, belong to that ink: a slightly blurred or noisy edge still splits at the half-way mark.
Each ink's connected regions are objects; a region's shape is the nearest ideal shape in a small space of
geometric features, and its score says how close it came, so that clean shapes clear GenEval's counting
threshold (0.9) and ill-formed blobs fall below it.
"""

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from gdro_ray.rewards.geneval import Detection, Detector
from gdro_ray.tiny_world.shapes import BACKGROUND, SHAPE_COLORS

# --- pixels: how much of which ink ------------------------------------------------------------------


@dataclass(frozen=True)
class InkReading:
    """Per pixel (each HxW): the index of the ink whose white-to-ink segment passes closest, the amount of
    that ink (0 white, 1 the pure ink) and the distance off the segment (RGB units, 0-255 scale)."""

    ink: np.ndarray
    amount: np.ndarray
    off_segment: np.ndarray


def read_inks(pixels: np.ndarray, inks: list[tuple[int, int, int]], paper=BACKGROUND) -> InkReading:
    """Each pixel of an HxWx3 RGB array as paper plus one of `inks` (see InkReading)."""
    paper = np.asarray(paper, dtype=np.float32)
    offset = pixels.astype(np.float32) - paper  # (H, W, 3)
    directions = np.asarray(inks, dtype=np.float32) - paper  # (K, 3)
    amounts = np.clip(offset @ directions.T / (directions**2).sum(axis=1), 0.0, 1.0)  # (H, W, K)
    distances = np.linalg.norm(offset[..., None, :] - amounts[..., None] * directions, axis=-1)  # (H, W, K)
    nearest = distances.argmin(axis=-1)
    pick = nearest[..., None]
    return InkReading(
        nearest, np.take_along_axis(amounts, pick, -1)[..., 0], np.take_along_axis(distances, pick, -1)[..., 0]
    )


def ink_masks(reading: InkReading, count: int, min_amount: float, max_off_segment: float) -> list[np.ndarray]:
    """One boolean HxW mask per ink: its pixels that are more than `min_amount` inked and off its segment
    by at most `max_off_segment` (a mixture of two inks belongs to neither)."""
    inked = (reading.amount > min_amount) & (reading.off_segment <= max_off_segment)
    return [inked & (reading.ink == index) for index in range(count)]


# --- geometry: which shape, how well formed ----------------------------------------------------------


@dataclass(frozen=True)
class ShapeFeatures:
    """Scale-free geometry of one region.

    fill: area over bounding-box area. offset: distance of the centroid from the box centre, in box sides.
    aspect: short over long box side. solidity: area over the area of its filled convex hull.
    """

    fill: float
    offset: float
    aspect: float
    solidity: float


# Ideal (fill, offset) per shape; every ideal shape has aspect 1 and solidity 1. A triangle with its apex
# up has its centroid a third of the way up from its base: a sixth of a side below its box centre.
SHAPE_PROTOTYPES = {"square": (1.0, 0.0), "circle": (math.pi / 4, 0.0), "triangle": (0.5, 1 / 6)}
# The offset axis is stretched because blur clips a triangle's tips and pushes its fill towards a circle's,
# while its centroid stays low: weighted so, blurred triangles stay triangles.
OFFSET_WEIGHT = 2.0
# Pixel hulls of small clean shapes are a little larger than the shapes (staircase edges): no penalty above.
SOLID_ENOUGH = 0.9
# Distance from the prototype at which the score reaches 0 (score = 1 - (d / SCORE_RADIUS)^2). Clean
# renders score >= 0.95; a region half-way between a square and a circle scores just under 0.9.
SCORE_RADIUS = 0.33


def shape_features(mask: np.ndarray) -> ShapeFeatures:
    """Features of the one region in a boolean mask (cropped or not)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    width, height, area = x1 - x0, y1 - y0, len(xs)
    # Pixel centres: the box centre of pixels x0..x1-1 is (x0 + x1 - 1) / 2.
    dx = (xs.mean() - (x0 + x1 - 1) / 2) / width
    dy = (ys.mean() - (y0 + y1 - 1) / 2) / height
    hull = cv2.convexHull(np.stack([xs, ys], axis=1).astype(np.int32))
    hull_mask = np.zeros(mask.shape, np.uint8)
    cv2.fillPoly(hull_mask, [hull], 1)
    return ShapeFeatures(
        fill=float(area / (width * height)),
        offset=float(math.hypot(dx, dy)),
        aspect=float(min(width, height) / max(width, height)),
        solidity=float(area / max(int(hull_mask.sum()), area)),
    )


def shape_distance(features: ShapeFeatures, shape: str) -> float:
    """Distance of a region from the ideal `shape`: fill, centroid offset, squareness and solidity."""
    fill, offset = SHAPE_PROTOTYPES[shape]
    return math.hypot(
        features.fill - fill,
        OFFSET_WEIGHT * (features.offset - offset),
        1.0 - features.aspect,
        max(0.0, SOLID_ENOUGH - features.solidity),
    )


def classify_shape(features: ShapeFeatures) -> tuple[str, float]:
    """The nearest ideal shape and a confidence in [0, 1] that falls with the distance to it."""
    shape = min(SHAPE_PROTOTYPES, key=lambda name: shape_distance(features, name))
    distance = shape_distance(features, shape)
    return shape, max(0.0, 1.0 - (distance / SCORE_RADIUS) ** 2)


# --- the detector ------------------------------------------------------------------------------------


class ShapesDetector(Detector):
    """Squares, circles and triangles in the four SHAPE_COLORS, each Detection with its colour set.

    min_area_fraction: regions smaller than this share of the image are specks, not objects (the smallest
    rendered shape covers about 3% of a 32x32 image). min_amount, max_off_segment: see ink_masks.
    """

    def __init__(self, min_area_fraction: float = 0.01, min_amount: float = 0.5, max_off_segment: float = 60.0):
        self.min_area_fraction = min_area_fraction
        self.min_amount = min_amount
        self.max_off_segment = max_off_segment
        self.color_names = sorted(SHAPE_COLORS)

    def detect(self, image: Image.Image) -> list[Detection]:
        pixels = np.asarray(image.convert("RGB"))
        reading = read_inks(pixels, [SHAPE_COLORS[name] for name in self.color_names])
        masks = ink_masks(reading, len(self.color_names), self.min_amount, self.max_off_segment)
        min_area = self.min_area_fraction * pixels.shape[0] * pixels.shape[1]
        return [
            detection
            for color, mask in zip(self.color_names, masks)
            for detection in self._regions(mask, color, min_area)
        ]

    @staticmethod
    def _regions(mask: np.ndarray, color: str, min_area: float) -> list[Detection]:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        detections = []
        for index in range(1, count):  # 0 is everything else
            x, y, width, height, area = stats[index]
            if area < min_area:
                continue
            region = labels == index
            label, score = classify_shape(shape_features(region[y : y + height, x : x + width]))
            detections.append(Detection(label, score, (int(x), int(y), int(x + width), int(y + height)), region, color))
        return detections
