"""A quality judge that asks a vision-language model, UnifiedReward style, for 1-5 ratings.

Any transformers image-text-to-text model works (Qwen2.5-VL, LLaVA, ...): it is shown the image with its
caption. In mode "single" it weighs visual quality and faithfulness to the caption into one answer,
"Final Score: X". In mode "three", as the GDRO paper rates with UnifiedReward, it rates alignment with the
caption, coherence and style separately, and u_hat is their mean.
Weights load as safetensors only, never with remote code, lazily on the first rating or on load().
Qwen VL processors (the default judge's) also need torchvision, for their video half.
"""

import re
import warnings
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from gdro_ray.rewards.base import Reward, RewardResult
from gdro_ray.rewards.quality import QUALITY_SCALE, QualityJudge

DEFAULT_JUDGE_ID = "CodeGoat24/UnifiedReward-qwen-7b"
NEUTRAL_RATING = sum(QUALITY_SCALE) / 2  # what an answer without a rating counts as; see VLMJudge

RATING_PROMPT = (
    "You are given a text caption and an image generated from it. Evaluate the image on two criteria:\n"
    "1. Visual quality: clarity, detail, absence of artifacts (distorted shapes, smeared or garbled text), "
    "coherence of the scene, and aesthetic appeal.\n"
    "2. Faithfulness to the caption: the objects, their counts, attributes and relations, and any text it asks for.\n"
    "Weigh both and give one score from 1 (worst) to 5 (best), answering with 'Final Score: X'.\n"
    "Text caption: {prompt}"
)

THREE_RATINGS_PROMPT = (
    "You are given a text caption and an image generated from it. Rate the image on three criteria, each "
    "from 1 (worst) to 5 (best):\n"
    "Alignment: how faithfully it shows the caption (objects, counts, attributes, relations, requested text).\n"
    "Coherence: whether the scene is physically and structurally sound, free of distortions and artifacts.\n"
    "Style: its aesthetic quality (lighting, colour, composition, detail).\n"
    "Answer with three lines: 'Alignment Score: X', 'Coherence Score: X', 'Style Score: X'.\n"
    "Text caption: {prompt}"
)
JUDGE_MODES = ("single", "three")
THREE_CRITERIA = ("alignment", "coherence", "style")

# "Final Score: 4", "final score:** 4.5"; and, for the fallback, scale mentions ("1-5", "4/5", "out of 5")
# whose numbers are not the rating.
_FINAL_SCORE = re.compile(r"final\s*score\s*[:：]?[\s*]*(\d+(?:\.\d+)?)", re.IGNORECASE)
_SCALE_MENTION = re.compile(r"\b1\s*(?:-|–|to)\s*5\b|(?:/|\bout\s+of)\s*5(?:\.0)?\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?!\w)")


def parse_three_ratings(text: str) -> dict[str, float] | None:
    """{"alignment": ..., "coherence": ..., "style": ...} from an answer to THREE_RATINGS_PROMPT, each the last
    one given and clamped to QUALITY_SCALE; None unless all three are there.

    >>> parse_three_ratings("Alignment Score: 4, Coherence Score: 3.5, Style Score: 5")
    {'alignment': 4.0, 'coherence': 3.5, 'style': 5.0}
    >>> parse_three_ratings("Alignment Score: 4") is None
    True
    """
    low, high = QUALITY_SCALE
    ratings = {}
    for criterion in THREE_CRITERIA:
        found = re.findall(rf"{criterion}\s*score\s*[:：]?[\s*]*(\d+(?:\.\d+)?)", text, re.IGNORECASE)
        if not found:
            return None
        ratings[criterion] = min(max(float(found[-1]), low), high)
    return ratings


def parse_rating(text: str) -> float | None:
    """The rating in a judge's answer, clamped to QUALITY_SCALE; None when it gives none.

    The last "Final Score: X" wins; without one, the last number within the scale.

    >>> parse_rating("Sharp and faithful. Final Score: 4.5")
    4.5
    >>> parse_rating("I would give it 2 out of 5.")
    2.0
    >>> parse_rating("no idea") is None
    True
    """
    low, high = QUALITY_SCALE
    if scores := _FINAL_SCORE.findall(text):
        return min(max(float(scores[-1]), low), high)
    numbers = [float(n) for n in _NUMBER.findall(_SCALE_MENTION.sub(" ", text))]
    in_scale = [n for n in numbers if low <= n <= high]
    return in_scale[-1] if in_scale else None


class VLMJudge(QualityJudge):
    """Rates images with a vision-language model from a hub id or a local directory; mode "single" (one
    rating) or "three" (the paper's: the mean of alignment, coherence and style).

    An answer without a readable rating (in mode "three": without all three) is rated the scale's midpoint, 3: the corrected score then counts
    that image's reward neither for nor against it (0.2 whatever the reward), where raising would stop a
    whole evaluation over one sentence. Such answers are counted in `unparsed`, and the first is warned of
    with its text, so that a judge that never answers in the expected form is noticed.
    """

    def __init__(self, model: str = DEFAULT_JUDGE_ID, device: str | None = None, batch_size: int = 8,
                 max_new_tokens: int | None = None, mode: str = "single"):
        if mode not in JUDGE_MODES:
            raise ValueError(f"judge mode must be one of {JUDGE_MODES}, got {mode!r}")
        # A path (not a hub id "owner/name") must exist now rather than after hours of generation.
        if _looks_like_path(model):
            model = str(Path(model).expanduser())
            if not Path(model).is_dir():
                raise FileNotFoundError(f"judge model directory {model!r} does not exist; expected a transformers "
                                        f"image-text-to-text model directory, or a hub id such as {DEFAULT_JUDGE_ID}")
        self.source = model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mode, self.batch_size = mode, batch_size
        self.max_new_tokens = max_new_tokens or (32 if mode == "single" else 64)  # three answers take longer
        self.model = self.processor = None
        self.unparsed = 0

    def describe(self) -> str:
        return f"VLMJudge({self.source}, {self.mode})"

    def load(self) -> None:
        """Load the model and processor now (rate() loads them otherwise), so a missing model fails early."""
        if self.model is not None:
            return
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.source, dtype=dtype, use_safetensors=True,
                                                                trust_remote_code=False)
            processor = AutoProcessor.from_pretrained(self.source, trust_remote_code=False)
        except (OSError, ValueError) as error:  # missing files, no network, or not a model transformers knows
            raise OSError(
                f"could not load judge model {self.source!r}: expected a local directory, or a hub id cached here or "
                f"reachable, of a transformers image-text-to-text model with safetensors weights: {error}"
            ) from error
        processor.tokenizer.padding_side = "left"  # a batch's answers must all start where its prompts end
        self.model, self.processor = model.to(self.device).eval(), processor

    def rate(self, images: list[Image.Image], metadata: list[dict]) -> list[float]:
        ratings = []
        for answer in self.ask(images, metadata):
            rating = self.rating_of(answer)
            if rating is None:
                if self.unparsed == 0:
                    warnings.warn(f"judge {self.source!r} gave no rating, rated {NEUTRAL_RATING} instead: {answer!r}",
                                  stacklevel=2)
                self.unparsed += 1
                rating = NEUTRAL_RATING
            ratings.append(rating)
        return ratings

    @torch.no_grad()
    def ask(self, images: list[Image.Image], metadata: list[dict]) -> list[str]:
        """The model's raw answers to the rating prompt, one per image, in order."""
        if len(images) != len(metadata):
            raise ValueError(f"got {len(images)} images for {len(metadata)} metadata records")
        self.load()
        answers = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            texts = [self._prompt(meta) for meta in metadata[start:start + self.batch_size]]
            inputs = self.processor(images=batch, text=texts, padding=True, return_tensors="pt")
            inputs = inputs.to(self.device, dtype=self.model.dtype)
            output = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
            answers += self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return answers

    def rating_of(self, answer: str) -> float | None:
        """The rating an answer gives in this judge's mode (three: their mean), None without one."""
        if self.mode == "single":
            return parse_rating(answer)
        ratings = parse_three_ratings(answer)
        return None if ratings is None else sum(ratings.values()) / len(ratings)

    def _prompt(self, meta: dict) -> str:
        question = (RATING_PROMPT if self.mode == "single" else THREE_RATINGS_PROMPT).format(prompt=meta["prompt"])
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)


class VLMJudgeReward(Reward):
    """The judge's 1-5 rating as a reward (alone, or a part of a mix against a task reward's hacking). An answer
    without a rating leaves its image unscored, with the answer in its details: unlike an evaluation's judge,
    a reward may not invent a neutral rating that would rank the image among the others."""

    name = "vlm_judge"

    def __init__(self, model: str = DEFAULT_JUDGE_ID, mode: str = "single", batch_size: int = 8,
                 max_new_tokens: int | None = None):
        self.judge = VLMJudge(model, batch_size=batch_size, max_new_tokens=max_new_tokens, mode=mode)

    def load(self) -> None:
        self.judge.load()

    def score(self, images: list[Image.Image], metadata: list[dict]) -> list[RewardResult]:
        results = []
        for answer in self.judge.ask(images, metadata):
            rating = self.judge.rating_of(answer)
            results.append(RewardResult(rating, {"answer": answer}) if rating is not None else
                           RewardResult(None, {"answer": answer, "error": "the judge's answer held no rating"}))
        return results


def _looks_like_path(source: str) -> bool:
    """A hub id is "owner/name"; anything absolute, relative to ".", "~", or deeper is a local path."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1
