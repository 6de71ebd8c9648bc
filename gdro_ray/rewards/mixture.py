"""A weighted mix of rewards: one reward against the hacking of any single one.

Spec: {"name": "mix", "parts": {LABEL: {"name": REWARD, "weight": W, ...its options}, ...}}. Each part is
scored on its own; an image's reward is the weighted sum of its parts, and every part's value stays in the
image's details ({"parts": {LABEL: value}, "details": {LABEL: the part's details}}). Offline every reward
is computed once per image, so a dataset can be ranked again with other weights, or with each part
normalised over its group first (as Flow-Factory normalises each reward before summing advantages),
without generating or scoring anything again: ``mix_values`` is that ranking, used by training.
"""

from PIL import Image

from gdro_ray.rewards.base import Reward, RewardResult, score_safely

MIX = "mix"


def mix_values(parts: list[dict[str, float]], weights: dict[str, float], normalise: bool = False) -> list[float]:
    """The mix of each member of one group from its parts' values: sum_l w_l r_l, or with normalise,
    sum_l w_l (r_l - mean_l) / std_l over the group (a part equal across the group adds nothing).

    >>> mix_values([{"a": 1.0, "b": 10.0}, {"a": 0.0, "b": 30.0}], {"a": 1.0, "b": 0.1})
    [2.0, 3.0]
    >>> mix_values([{"a": 1.0, "b": 10.0}, {"a": 0.0, "b": 30.0}], {"a": 1.0, "b": 0.1}, normalise=True)
    [0.9, -0.9]
    """
    missing = sorted({label for label in weights if any(label not in member for member in parts)})
    if missing:
        raise ValueError(f"reward parts {missing} are not in the scored parts {sorted(parts[0]) if parts else []}")
    total = [0.0] * len(parts)
    for label, weight in weights.items():
        values = [member[label] for member in parts]
        if normalise:
            mean = sum(values) / len(values)
            std = (sum((value - mean) ** 2 for value in values) / len(values)) ** 0.5
            values = [(value - mean) / std if std > 0 else 0.0 for value in values]
        total = [sum_ + weight * value for sum_, value in zip(total, values)]
    return total


class MixedReward(Reward):
    name = MIX

    def __init__(self, parts: dict[str, tuple[Reward, float]]):
        if not parts:
            raise ValueError("a mixed reward needs at least one part")
        self.parts = parts

    @property
    def weights(self) -> dict[str, float]:
        return {label: weight for label, (_, weight) in self.parts.items()}

    def load(self) -> None:
        for reward, _ in self.parts.values():
            reward.load()

    def score(self, images: list[Image.Image], metadata: list[dict]) -> list[RewardResult]:
        scored = {label: score_safely(reward, images, metadata) for label, (reward, _) in self.parts.items()}
        results = []
        for index in range(len(images)):
            values = {label: part[index].reward for label, part in scored.items()}
            details = {"parts": values, "details": {label: part[index].details for label, part in scored.items()}}
            failed = sorted(label for label, value in values.items() if value is None)
            if failed:  # no mix without all its parts: the image is unscored, as any failed reward's
                details["error"] = f"parts {failed} could not be scored"
                results.append(RewardResult(None, details))
            else:
                results.append(RewardResult(mix_values([values], self.weights)[0], details))
        return results
