"""The one interface every reward implements, and the guard that runs it.

A reward scores a batch of (image, prompt metadata) pairs. Metadata is the prompt record's task
metadata plus its "prompt" (for GenEval: tag, include, exclude; for OCR the target sits in the prompt).
Details are JSON-serialisable and written beside each reward in the dataset.
"""

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from PIL import Image


@dataclass
class RewardResult:
    reward: float | None  # None: the reward could not be computed (the error is in details)
    details: dict = field(default_factory=dict)


class Reward(ABC):
    name: str

    @abstractmethod
    def score(self, images: list[Image.Image], metadata: list[dict]) -> list[RewardResult]:
        """One result per image, in order. May raise; score_safely isolates failures per image."""

    def load(self) -> None:
        """Load the models now (rewards may load lazily), so that a missing model stops a run at its start."""


def score_safely(reward: Reward, images: list[Image.Image], metadata: list[dict]) -> list[RewardResult]:
    """Score a batch; an image whose scoring fails gets no reward (None), with the error in its details: it
    is not a worst sample, and rankings and means leave it out.

    A NaN reward is a bug in the reward, not a property of the image: it is refused with an error
    rather than written.
    """
    if len(images) != len(metadata):
        raise ValueError(f"got {len(images)} images for {len(metadata)} metadata records")
    try:
        results = reward.score(images, metadata)
    except Exception:  # find the image(s) that fail, score the rest
        results = [_score_one(reward, image, meta) for image, meta in zip(images, metadata)]
    if len(results) != len(images):
        raise ValueError(f"reward {reward.name!r} returned {len(results)} results for {len(images)} images")
    for index, (result, meta) in enumerate(zip(results, metadata)):
        if result.reward is None and "error" in result.details:
            continue
        if not isinstance(result.reward, (int, float)) or math.isnan(result.reward):
            raise ValueError(
                f"reward {reward.name!r} gave {result.reward!r} for image {index} of prompt {meta.get('prompt')!r}; "
                "refusing to write a non-number"
            )
    return results


def _score_one(reward: Reward, image: Image.Image, meta: dict) -> RewardResult:
    try:
        return reward.score([image], [meta])[0]
    except Exception as error:  # noqa: BLE001 - recorded, and the run goes on
        return RewardResult(None, {"error": f"{type(error).__name__}: {error}"})
