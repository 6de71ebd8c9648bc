"""Quality judges, and the GDRO paper's corrected score that weighs a task reward by image quality.

A task reward can be gamed: an image that games it (text repeated, shapes smeared into the asked-for
count) scores well and looks bad. A judge rates how an image looks, on a 1-5 scale, and the corrected
score counts the reward only as far as quality is above average.
"""

from abc import ABC, abstractmethod

from PIL import Image

QUALITY_SCALE = (1.0, 5.0)


class QualityJudge(ABC):
    """Rates images on QUALITY_SCALE (1 worst, 5 best), given the prompt metadata each was made for.

    unparsed: answers the judge gave without a usable rating, rated the scale's midpoint instead; judges
    that always answer (rules, a scoring server that validates) keep it 0."""

    unparsed: int = 0

    def describe(self) -> str:
        """Which judge this is, recorded beside the corrected score it produced."""
        return type(self).__name__

    @abstractmethod
    def rate(self, images: list[Image.Image], metadata: list[dict]) -> list[float]:
        """One rating per image, in order."""


def corrected_score(reward: float, quality: float) -> float:
    """The GDRO paper's corrected score: reward x (quality - 3) + 0.2.

    An average image (quality 3) gets 0.2 whatever its reward; above average the reward counts in
    proportion, below it counts against.

    >>> corrected_score(1.0, 5.0)
    2.2
    >>> corrected_score(1.0, 1.0)
    -1.8
    >>> corrected_score(0.5, 3.0)
    0.2
    """
    return reward * (quality - 3.0) + 0.2
