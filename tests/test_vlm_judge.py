import math
import warnings

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from gdro_ray.profiles import profile_for, quality_judge
from gdro_ray.rewards import build_reward, score_safely
from gdro_ray.rewards.vlm_judge import NEUTRAL_RATING, VLMJudge, parse_rating, parse_three_ratings

# Qwen-style chat turns; an image is one <image> token, which the processor expands to the vision tower's patches.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    """A randomly initialised LLaVA (CLIP vision tower, Qwen2 language model) saved like any hub checkpoint.

    LLaVA, not Qwen2-VL: Qwen2-VL's processor needs a video processor, which transformers 5 builds only
    with torchvision, and this environment has none. The tokenizer is a byte-level BPE without merges, so
    it is built here, offline.
    """
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                     merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                               patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-vlm")
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


IMAGES = [Image.new("RGB", (48, 32), (200, 30, 30)), Image.new("L", (64, 64), 90)]
METADATA = [{"prompt": "a red square"}, {"prompt": "a grey square", "tag": "colors"}]


def test_tiny_model_rates_each_image_within_the_scale(tiny_vlm_dir):
    judge = VLMJudge(str(tiny_vlm_dir), device="cpu", batch_size=1)  # batches of 1: the batching loop runs twice
    assert judge.model is None  # loaded lazily
    answers = judge.ask(IMAGES, METADATA)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    assert judge.model.dtype == torch.float32 and not judge.model.training

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ratings = judge.rate(IMAGES, METADATA)
        judge.rate(IMAGES, METADATA)  # unparsed answers are counted every time but warned of once
    assert len(ratings) == 2
    assert all(math.isfinite(rating) and 1.0 <= rating <= 5.0 for rating in ratings)
    # Greedy decoding: rate() read the same answers; the random model's are most likely unreadable.
    parsed = [parse_rating(answer) for answer in answers]
    assert ratings == [NEUTRAL_RATING if rating is None else rating for rating in parsed]
    assert judge.unparsed == 2 * parsed.count(None)
    assert len([w for w in caught if "gave no rating" in str(w.message)]) == min(1, judge.unparsed)


def test_batches_pad_on_the_left(tiny_vlm_dir):
    """Batched and one-by-one answers agree only if prompts of different lengths are padded on the left."""
    judge = VLMJudge(str(tiny_vlm_dir), device="cpu")
    metadata = [{"prompt": "a red square"}, {"prompt": "a grey square on a much longer caption than the other"}]
    assert judge.ask(IMAGES, metadata) == judge.ask(IMAGES[:1], metadata[:1]) + judge.ask(IMAGES[1:], metadata[1:])


@pytest.mark.parametrize(("text", "expected"), [
    ("Final Score: 4", 4.0),
    ("final score:4.5", 4.5),
    ("The image is sharp and faithful.\nFinal Score: **3**", 3.0),
    ("Final Score：2", 2.0),  # a full-width colon
    ("Final Score: 5.", 5.0),
    ("Final Score: 7", 5.0),  # clamped to the scale
    ("Final Score: 0", 1.0),
    ("Final Score: 2\nOn reflection, Final Score: 4", 4.0),  # the last verdict
    ("Final Score: 4/5", 4.0),
    ("I would rate it 4 out of 5.", 4.0),
    ("Score: 2/5", 2.0),
    ("On a scale of 1-5 this is a 3.", 3.0),
    ("Rating: 4 (on a 1 to 5 scale)", 4.0),
    ("There are 10 cats; quality 2", 2.0),  # numbers outside the scale are not ratings
    ("3.5", 3.5),
    ("Qwen2 drew 12 apples", None),
    ("Final Score: N/A", None),
    ("no idea", None),
    ("", None),
])
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("Alignment Score: 4\nCoherence Score: 3\nStyle Score: 5", {"alignment": 4.0, "coherence": 3.0, "style": 5.0}),
    ("alignment score:** 2.5, coherence score: 7, STYLE SCORE：1", {"alignment": 2.5, "coherence": 5.0, "style": 1.0}),
    ("Alignment Score: 1\nAlignment Score: 4\nCoherence Score: 3\nStyle Score: 3",
     {"alignment": 4.0, "coherence": 3.0, "style": 3.0}),  # the last verdict
    ("Alignment Score: 4\nCoherence Score: 3", None),  # all three or none
    ("Final Score: 4", None),
])
def test_parse_three_ratings(text, expected):
    assert parse_three_ratings(text) == expected


def test_the_papers_three_ratings_average_into_one_and_unreadable_answers_are_counted(tiny_vlm_dir):
    judge = VLMJudge(str(tiny_vlm_dir), device="cpu", mode="three")
    assert judge.describe() == f"VLMJudge({tiny_vlm_dir}, three)" and judge.max_new_tokens == 64
    answers = judge.ask(IMAGES, METADATA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ratings = judge.rate(IMAGES, METADATA)
    expected = [NEUTRAL_RATING if (r := parse_three_ratings(answer)) is None else sum(r.values()) / 3
                for answer in answers]
    assert ratings == expected and judge.unparsed == sum(parse_three_ratings(a) is None for a in answers)
    with pytest.raises(ValueError, match="judge mode must be one of"):
        VLMJudge(str(tiny_vlm_dir), mode="five")
    with pytest.raises(ValueError, match="pass --judge-model too"):
        quality_judge("tiny", judge_mode="three")


def test_rate_refuses_mismatched_lengths(tiny_vlm_dir):
    judge = VLMJudge(str(tiny_vlm_dir), device="cpu")
    with pytest.raises(ValueError, match="2 images for 1 metadata"):
        judge.rate(IMAGES, METADATA[:1])
    assert judge.model is None  # refused before loading anything


def test_missing_model_errors_name_the_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-judge.*does not exist"):
        VLMJudge(str(tmp_path / "missing-judge"))
    with pytest.raises(OSError, match="could not load judge model 'gdro-test/no-such-judge'.*safetensors"):
        VLMJudge("gdro-test/no-such-judge").load()  # offline in tests: not cached, not reachable
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="could not load judge model .*empty"):
        VLMJudge(str(tmp_path / "empty")).load()


def test_default_judge_builds_a_vlm_judge(tiny_vlm_dir):
    judge = quality_judge("tiny", judge_model=str(tiny_vlm_dir))
    assert isinstance(judge, VLMJudge) and judge.source == str(tiny_vlm_dir)
    with pytest.raises(ValueError, match="not both"):
        quality_judge("tiny", judge_url="http://judge:8000/score", judge_model=str(tiny_vlm_dir))


def test_the_judge_as_a_reward_gives_its_ratings_and_leaves_answers_without_one_unscored(tiny_vlm_dir):
    reward = build_reward(profile_for("tiny").reward_spec("ocr", None, {"name": "vlm_judge", "model": str(tiny_vlm_dir)}))
    reward.load()
    results = score_safely(reward, IMAGES, METADATA)
    answers = VLMJudge(str(tiny_vlm_dir), device="cpu").ask(IMAGES, METADATA)
    for result, answer in zip(results, answers, strict=True):
        assert result.details["answer"] == answer  # greedy: the judge's own answers
        assert result.reward == parse_rating(answer)  # None where the random model's answer holds no rating
        assert result.reward is not None or "held no rating" in result.details["error"]
