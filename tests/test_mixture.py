"""Mixed rewards: the mix is the weighted sum of its parts, each part kept; specs are completed and checked."""

import pytest
from PIL import Image

from gdro_ray.profiles import profile_for
from gdro_ray.rewards import build_reward, score_safely
from gdro_ray.rewards.base import Reward, RewardResult
from gdro_ray.rewards.mixture import MixedReward, mix_values

IMAGES = [Image.new("RGB", (32, 32), (shade, shade, shade)) for shade in (0, 128, 255)]
METADATA = [{"prompt": 'a sign that says "GDRO"'}] * 3


class FailsOnBlack(Reward):
    name = "fails_on_black"

    def score(self, images, metadata):
        if any(image.getpixel((0, 0)) == (0, 0, 0) for image in images):
            raise RuntimeError("black image")
        return [RewardResult(1.0) for _ in images]


def test_the_mix_is_the_weighted_sum_of_its_parts_and_keeps_them():
    spec = profile_for("tiny").reward_spec("ocr", None, {"name": "mix", "parts": {
        "text": {"name": "ocr", "weight": 2.0}, "light": {"name": "brightness", "weight": 0.5}}})
    assert spec["parts"]["text"] == {"name": "ocr", "engine": "rapidocr", "min_side": 256, "detection": "image",
                                     "weight": 2.0}  # each part completed with its reward's defaults
    mix = build_reward(spec)
    text = build_reward({key: value for key, value in spec["parts"]["text"].items() if key != "weight"})
    light = build_reward({"name": "brightness"})
    for result, ocr, brightness in zip(score_safely(mix, IMAGES, METADATA), text.score(IMAGES, METADATA),
                                       light.score(IMAGES, METADATA)):
        assert result.details["parts"] == {"text": ocr.reward, "light": brightness.reward}
        assert result.reward == pytest.approx(2.0 * ocr.reward + 0.5 * brightness.reward)
        assert result.details["details"]["text"] == ocr.details
    assert [r.reward for r in mix.score(IMAGES, METADATA)][2] == pytest.approx(0.5)  # white, no text: 0.5 x 1


def test_an_image_whose_part_fails_is_unscored_with_its_other_parts_kept():
    mix = MixedReward({"light": (build_reward({"name": "brightness"}), 1.0), "fragile": (FailsOnBlack(), 1.0)})
    black, grey, _ = score_safely(mix, IMAGES, METADATA)
    assert black.reward is None and "['fragile'] could not be scored" in black.details["error"]
    assert black.details["parts"] == {"light": 0.0, "fragile": None}
    assert grey.reward == pytest.approx(128 / 255 + 1.0)


def test_group_normalisation_weighs_parts_by_their_spread_in_the_group():
    parts = [{"a": 1.0, "b": 10.0}, {"a": 0.0, "b": 30.0}, {"a": 0.5, "b": 20.0}]
    assert mix_values(parts, {"a": 1.0, "b": 0.1}) == pytest.approx([2.0, 3.0, 2.5])
    normalised = mix_values(parts, {"a": 1.0, "b": 0.1}, normalise=True)
    assert normalised == pytest.approx([0.9 * 1.224745, -0.9 * 1.224745, 0.0], abs=1e-5)  # z-scores +-1.2247
    assert mix_values([{"a": 1.0}, {"a": 1.0}], {"a": 1.0}, normalise=True) == [0.0, 0.0]  # no spread, no say
    with pytest.raises(ValueError, match=r"reward parts \['c'\] are not in the scored parts"):
        mix_values(parts, {"c": 1.0})


@pytest.mark.parametrize("overrides, message", [
    ({"name": "mix"}, 'a "mix" reward needs "parts"'),
    ({"name": "mix", "parts": {"a": {"name": "brightness"}}}, "mix part 'a' must be a reward spec .* numeric weight"),
    ({"name": "mix", "parts": {"a": {"name": "mix", "weight": 1}}}, "mix part 'a' must be a reward spec"),
    ({"name": "mix", "parts": {"a": {"name": "hpsv9", "weight": 1}}}, "no reward for 'hpsv9'"),
])
def test_bad_mix_specs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        profile_for("tiny").reward_spec("ocr", None, overrides)
