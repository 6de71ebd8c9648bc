import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import RTDetrConfig, RTDetrForObjectDetection
from transformers.models.rt_detr.image_processing_pil_rt_detr import RTDetrImageProcessorPil

from conftest import tiny_clip_parts
from gdro_ray.rewards.base import score_safely
from gdro_ray.rewards.geneval import (
    GENEVAL_CLASSES,
    GENEVAL_COLORS,
    GENEVAL_TAGS,
    MAX_OBJECTS_PER_CLASS,
    ColorClassifier,
    Detection,
    Detector,
    GenEvalReward,
    confidence_threshold,
    geneval_correct,
    geneval_overall,
    geneval_tag_accuracy,
    keep_confident,
    objects_to_color,
    parse_task,
    partial_credit,
    relations,
)
from gdro_ray.rewards.geneval_backend import (
    GREY_BACKGROUND,
    ClipColorClassifier,
    TransformersDetector,
    geneval_class,
    object_crop,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METADATA_FILES = ["geneval_evaluation_metadata.jsonl", "flowgrpo_geneval_test_metadata.jsonl"]

SINGLE = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
TWO = {"tag": "two_object", "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1}], "prompt": "p"}
COUNTING = {
    "tag": "counting",
    "include": [{"class": "clock", "count": 2}],
    "exclude": [{"class": "clock", "count": 3}],
    "prompt": "a photo of two clocks",
}
COLORS = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "prompt": "a photo of a pink car"}
COLOR_ATTR = {
    "tag": "color_attr",
    "include": [{"class": "handbag", "count": 1, "color": "pink"}, {"class": "scissors", "count": 1, "color": "black"}],
    "prompt": "a photo of a pink handbag and a black scissors",
}
POSITION = {  # "a photo of a dog right of a bench"
    "tag": "position",
    "include": [{"class": "bench", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    "prompt": "a photo of a dog right of a bench",
}
BENCH_BOX = (0.0, 0.0, 10.0, 10.0)


def det(label, score=0.95, box=BENCH_BOX, color=None):
    return Detection(label, score, box, color=color)


def judge(metadata, detections):
    """(GenEval's verdict, Flow-GRPO's partial credit) for detections of one image."""
    task = parse_task(metadata)
    detected = keep_confident(detections, confidence_threshold(task.tag))
    return geneval_correct(task, detected)[0], partial_credit(task, detected)[0]


# --- filtering --------------------------------------------------------------------------------------


def test_threshold_is_strict_and_counting_prompts_use_0_9():
    kept = keep_confident([det("cup", 0.3), det("cup", 0.31), det("dog", 0.29)], confidence_threshold("two_object"))
    assert [d.score for d in kept["cup"]] == [0.31] and "dog" not in kept
    kept = keep_confident([det("clock", 0.89), det("clock", 0.91)], confidence_threshold("counting"))
    assert [d.score for d in kept["clock"]] == [0.91]


def test_at_most_16_per_class_keeping_the_most_confident():
    cups = [det("cup", 0.40 + 0.01 * i) for i in range(20)]  # 0.40 .. 0.59, shuffled below
    kept = keep_confident(cups[::2] + cups[1::2] + [det("dog", 0.5)], 0.3)
    assert len(kept["cup"]) == MAX_OBJECTS_PER_CLASS
    assert [round(d.score, 2) for d in kept["cup"]] == [round(0.59 - 0.01 * i, 2) for i in range(16)]
    assert len(kept["dog"]) == 1


# --- the rules, every tag, both modes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "detections, correct, credit",
    [
        ([det("bench", 0.5)], True, 1.0),
        ([], False, 0.0),  # 1 - |1 - 0| / 1
        ([det("bench", 0.25)], False, 0.0),  # under the 0.3 threshold
        ([det("bench"), det("bench")], True, 0.0),  # GenEval: at least one; Flow-GRPO: 1 - |1 - 2| / 1
        ([det("bench")] * 3, True, -1.0),  # Flow-GRPO's count term goes below 0: 1 - |1 - 3| / 1
    ],
)
def test_single_object(detections, correct, credit):
    assert judge(SINGLE, detections) == (correct, pytest.approx(credit))


def test_two_object():
    assert judge(TWO, [det("cup"), det("dog")]) == (True, 1.0)
    assert judge(TWO, [det("cup")]) == (False, 0.5)  # terms (1, 0)
    assert judge(TWO, [det("cup"), det("cat")]) == (False, 0.5)


@pytest.mark.parametrize(
    "detections, correct, credit",
    [
        ([det("clock")] * 2, True, 1.0),
        ([det("clock")] * 3, False, 0.5),  # the exclude clause fires at 3; 1 - |2 - 3| / 2
        ([det("clock")] * 2 + [det("clock", 0.85)], True, 1.0),  # the third is under counting's 0.9
        ([det("clock")], False, 0.5),  # 1 - |2 - 1| / 2
        ([det("clock")] * 4, False, 0.0),
    ],
)
def test_counting(detections, correct, credit):
    assert judge(COUNTING, detections) == (correct, credit)


@pytest.mark.parametrize(
    "detections, correct, credit",
    [
        ([det("car", color="pink")], True, 1.0),  # terms (1, 1)
        ([det("car", color="red")], False, 0.5),  # terms (1, 0)
        ([det("car", 0.9, color="pink"), det("car", 0.5, color="red")], True, 0.0),  # GenEval reads the top car
        ([det("car", 0.5, color="pink"), det("car", 0.9, color="red")], False, 0.0),  # partial: count 2 != 1
        ([], False, 0.0),  # terms (0, 0)
    ],
)
def test_colors(detections, correct, credit):
    assert judge(COLORS, detections) == (correct, credit)


@pytest.mark.parametrize(
    "detections, correct, credit",
    [
        ([det("handbag", color="pink"), det("scissors", color="black")], True, 1.0),
        ([det("handbag", color="pink"), det("scissors", color="white")], False, 0.75),  # (1, 1, 1, 0)
        ([det("scissors", color="black")], False, 0.5),  # (0, 0, 1, 1)
    ],
)
def test_color_attr(detections, correct, credit):
    assert judge(COLOR_ATTR, detections) == (correct, credit)


def test_relations_hand_worked():
    # Offset (30, 0), extents (20, 20): shrunk (28, 0) / 30 -> dx = 0.93.
    assert relations((30, 0, 40, 10), BENCH_BOX) == {"right of"}
    assert relations(BENCH_BOX, (30, 0, 40, 10)) == {"left of"}
    assert relations((0, 30, 10, 40), BENCH_BOX) == {"below"}
    assert relations((0, -30, 10, -20), BENCH_BOX) == {"above"}
    # Diagonal: offset (12, 12), shrunk (10, 10) / 16.97 -> 0.59 on both axes.
    assert relations((12, 12, 22, 22), BENCH_BOX) == {"right of", "below"}
    # Steep: offset (5, 30), shrunk (3, 28) / 30.4 -> dx 0.10, dy 0.92.
    assert relations((5, 30, 15, 40), BENCH_BOX) == {"below"}
    # Overlapping: offset (1, 0) is within the margin 0.1 x 20 -> no relation.
    assert relations((1, 0, 11, 10), BENCH_BOX) == set()


@pytest.mark.parametrize(
    "detections, correct, credit",
    [
        ([det("bench"), det("dog", box=(30, 0, 40, 10))], True, 1.0),  # terms (1, 1, 1)
        ([det("bench"), det("dog", box=(12, 12, 22, 22))], True, 1.0),  # right of and below
        ([det("bench"), det("dog", box=(-30, 0, -20, 10))], False, 0.75),  # Flow-GRPO: (1, 1, 0, 1)
        ([det("bench"), det("dog", box=(1, 0, 11, 10))], False, 0.75),  # overlapping: no relation
        ([det("dog", box=(30, 0, 40, 10))], False, pytest.approx(1 / 3)),  # no target: (0, 1, 0)
        # GenEval checks the top dog only; Flow-GRPO sees two dogs: (1, 0, 0).
        ([det("bench"), det("dog", 0.9, box=(30, 0, 40, 10)), det("dog", 0.5, box=(-30, 0, -20, 10))], True, 1 / 3),
    ],
)
def test_position(detections, correct, credit):
    assert judge(POSITION, detections) == (correct, pytest.approx(credit))


def test_position_needs_every_object_against_every_target():
    metadata = {
        "tag": "position",
        "include": [{"class": "cup", "count": 2}, {"class": "dog", "count": 1, "position": ["above", 0]}],
        "prompt": "p",
    }
    cups = [det("cup", box=(0, 30, 10, 40)), det("cup", box=(20, 30, 30, 40))]
    assert judge(metadata, cups + [det("dog", box=(0, 0, 10, 10))]) == (True, 1.0)  # above both
    # Above the second cup only (dy -0.42 against the first): Flow-GRPO's terms (1, 1, 0, 1).
    assert judge(metadata, cups + [det("dog", box=(60, 0, 70, 10))]) == (False, 0.75)


def test_details_say_what_failed_and_are_json():
    task = parse_task(COLOR_ATTR)
    detected = keep_confident([det("handbag", color="pink"), det("scissors", color="white")], 0.3)
    correct, details = geneval_correct(task, detected)
    assert not correct
    assert details["clauses"][1] == {"class": "scissors", "count": 1, "found": 1, "failed": "color", "colors": ["white"]}
    credit, details = partial_credit(task, detected)
    assert details["terms"] == [1.0, 1.0, 1.0, 0.0] and details["exact_correct"] is False
    json.dumps(details)
    _, details = geneval_correct(parse_task(COUNTING), keep_confident([det("clock")] * 3, 0.9))
    assert details["excluded_found"] == [{"class": "clock", "limit": 3, "found": 3}]


def test_colors_are_read_from_the_top_count_objects_only():
    task = parse_task(COLORS)
    detected = keep_confident([det("car", 0.5), det("car", 0.9), det("dog")], 0.3)
    assert [d.score for d in objects_to_color(task, detected)] == [0.9]
    assert objects_to_color(task, keep_confident([det("dog")], 0.3)) == []


# --- overall score --------------------------------------------------------------------------------


def test_overall_is_the_mean_of_per_tag_accuracies():
    per_image = [("single_object", True), ("single_object", False), ("counting", True)]
    assert geneval_tag_accuracy(per_image) == {"single_object": 0.5, "counting": 1.0}
    assert geneval_overall(per_image) == 0.75  # not the 2/3 of images correct
    with pytest.raises(ValueError, match="unknown GenEval tag 'shape'"):
        geneval_overall([("shape", True)])
    with pytest.raises(ValueError):
        geneval_overall([])


# --- metadata -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METADATA_FILES)
def test_every_shared_metadata_record_parses(name):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tasks = [parse_task(record) for record in records]
    assert len(tasks) > 500
    assert {task.tag for task in tasks} == set(GENEVAL_TAGS)
    classes = {clause.label for task in tasks for clause in task.include + task.exclude}
    assert classes <= set(GENEVAL_CLASSES)
    counting = [task for task in tasks if task.tag == "counting"]
    assert all(task.exclude[0].count == task.include[0].count + 1 for task in counting)


def test_class_list_is_genevals():
    path = SHARED_DATA / "geneval_object_names.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    assert GENEVAL_CLASSES == tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"tag": "shapes", "include": [{"class": "cup", "count": 1}]}, r"'tag': expected one of .*single_object"),
        ({"tag": "colors"}, r"'include': expected a non-empty list"),
        ({"tag": "colors", "include": [{"count": 1}]}, r"'include\[0\]\.class': expected an object class name"),
        ({"tag": "colors", "include": [{"class": "cup"}]}, r"'include\[0\]\.count': expected a positive integer"),
        ({"tag": "colors", "include": [{"class": "cup", "count": 0}]}, r"'include\[0\]\.count'"),
        ({"tag": "colors", "include": [{"class": "cup", "count": True}]}, r"'include\[0\]\.count'"),
        (
            {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "teal"}]},
            r"'include\[0\]\.color': expected one of .*'red'.*got 'teal'",
        ),
        (
            {"tag": "position", "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["behind", 0]}]},
            r"'include\[1\]\.position' relation: expected one of .*'left of'.*got 'behind'",
        ),
        (
            {"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["above", 0]}]},
            r"'include\[0\]\.position' target: expected the index of an earlier include clause",
        ),
        (
            {"tag": "counting", "include": [{"class": "cup", "count": 1}], "exclude": [{"class": "cup", "count": 2, "color": "red"}]},
            r"'exclude\[0\]': expected only 'class' and 'count'",
        ),
    ],
)
def test_bad_metadata_names_the_field(metadata, message):
    with pytest.raises(ValueError, match=message):
        parse_task(metadata)


# --- the reward, on fake backends -------------------------------------------------------------------


class FixedDetector(Detector):
    def __init__(self, detections):
        self.detections = detections

    def detect(self, image):
        return list(self.detections)


class ColorByBox(ColorClassifier):
    """Colours looked up by box; records what it was asked."""

    def __init__(self, colors):
        self.colors = colors
        self.asked = []

    def classify(self, image, detections):
        self.asked += detections
        return [self.colors[d.box] for d in detections]


IMAGE = Image.new("RGB", (64, 64), "white")


def test_reward_modes_and_spec():
    detections = [det("handbag", box=(0, 0, 9, 9)), det("scissors", box=(20, 20, 29, 29)), det("dog")]
    colors = ColorByBox({(0, 0, 9, 9): "pink", (20, 20, 29, 29): "white"})
    strict = GenEvalReward(FixedDetector(detections), colors, mode="strict")
    partial = GenEvalReward(FixedDetector(detections), colors, mode="partial")
    [strict_result] = score_safely(strict, [IMAGE], [COLOR_ATTR])
    [partial_result] = score_safely(partial, [IMAGE], [COLOR_ATTR])
    assert strict_result.reward == 0.0 and partial_result.reward == 0.75
    for result in (strict_result, partial_result):
        assert result.details["correct"] is False and result.details["partial_credit"] == 0.75
        assert result.details["found"] == {"handbag": 1, "scissors": 1, "dog": 1}
        json.dumps(result.details)
    assert {d.label for d in colors.asked} == {"handbag", "scissors"}  # the dog's colour is never needed
    with pytest.raises(ValueError, match="mode"):
        GenEvalReward(FixedDetector([]), None, mode="soft")


def test_detector_colours_need_no_classifier():
    reward = GenEvalReward(FixedDetector([det("car", color="pink")]), None, mode="strict")
    assert reward.score([IMAGE], [COLORS])[0].reward == 1.0


def test_colour_clause_without_colours_fails_loudly():
    reward = GenEvalReward(FixedDetector([det("car")]), None)
    with pytest.raises(ValueError, match="ColorClassifier"):
        reward.score([IMAGE], [COLORS])
    [result] = score_safely(reward, [IMAGE], [COLORS])
    assert result.reward is None and "ColorClassifier" in result.details["error"]


def test_bad_metadata_is_isolated_per_image():
    reward = GenEvalReward(FixedDetector([det("bench")]), None)
    results = score_safely(reward, [IMAGE, IMAGE], [SINGLE, {"tag": "nope", "include": []}])
    assert results[0].reward == 1.0
    assert results[1].reward is None and "'tag'" in results[1].details["error"]


# --- the transformers backend on tiny random models --------------------------------------------------

# RT-DETR's converted checkpoints spell some COCO classes the old mmdetection way; keep two of those.
TINY_DETECTOR_LABELS = dict(enumerate(GENEVAL_CLASSES)) | {3: "motorbike", 62: "tvmonitor"}


def tiny_detector_parts(labels=TINY_DETECTOR_LABELS):
    torch.manual_seed(0)
    config = RTDetrConfig(
        backbone_config=dict(
            model_type="rt_detr_resnet",
            embedding_size=8,
            hidden_sizes=[8, 8, 16, 16],
            depths=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"],
        ),
        encoder_in_channels=[8, 16, 16],
        encoder_hidden_dim=16,
        encoder_ffn_dim=32,
        encoder_attention_heads=2,
        encoder_layers=1,
        d_model=16,
        decoder_in_channels=[16, 16, 16],
        decoder_ffn_dim=32,
        decoder_attention_heads=2,
        decoder_layers=1,
        decoder_n_points=2,
        num_queries=10,
        num_denoising=0,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    return RTDetrForObjectDetection(config), RTDetrImageProcessorPil(size={"height": 64, "width": 64})


@pytest.fixture(scope="module")
def saved_backends(tmp_path_factory):
    """Tiny detector and CLIP saved like any checkpoints, so tests load them the way users do."""
    root = tmp_path_factory.mktemp("geneval-backends")
    for name, (model, processor) in {"detector": tiny_detector_parts(), "clip": tiny_clip_parts()}.items():
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return root


def random_image(seed, size=(80, 48)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_label_aliases():
    assert geneval_class("motorbike") == "motorcycle"
    assert geneval_class("tvmonitor") == "tv"
    assert geneval_class("Dining_Table") == "dining table"
    assert geneval_class("mouse") == "computer mouse"
    assert geneval_class("cup") == "cup"
    assert geneval_class("N/A") is None


def test_detector_loads_and_detects(saved_backends):
    detector = TransformersDetector.from_pretrained(str(saved_backends / "detector"))
    assert detector.classes[3] == "motorcycle" and len(detector.classes) == 80
    image = random_image(0)
    detections = detector.detect(image)
    assert detections  # threshold 0: every top-k detection comes back
    for detection in detections:
        assert detection.label in GENEVAL_CLASSES and 0.0 <= detection.score <= 1.0 and detection.mask is None
        x0, y0, x1, y1 = detection.box
        assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height


def test_detector_without_coco_labels_is_refused():
    model, processor = tiny_detector_parts(labels={i: f"LABEL_{i}" for i in range(80)})
    with pytest.raises(ValueError, match="no label among GenEval's 80 COCO classes"):
        TransformersDetector(model, processor)


@pytest.mark.parametrize("backend", [TransformersDetector, ClipColorClassifier])
def test_loading_offline_names_the_model(backend):
    with pytest.raises(OSError, match="no-such-org/no-such-model"):
        backend.from_pretrained("no-such-org/no-such-model")


def test_object_crop_pastes_the_mask_on_grey():
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:6, 4:8] = True
    crop = object_crop(image, Detection("cup", 0.9, (2.0, 1.0, 10.0, 8.0), mask=mask))
    assert crop.size == (8, 7)
    assert crop.getpixel((3, 2)) == (255, 0, 0)  # inside the mask
    assert crop.getpixel((0, 0)) == GREY_BACKGROUND
    assert object_crop(image, det("cup", box=(2.0, 1.0, 10.0, 8.0))).getpixel((0, 0)) == (255, 0, 0)
    assert object_crop(image, det("cup", box=(5.0, 5.0, 5.0, 5.0))).size == (1, 1)


def test_clip_classifier_names_a_colour_per_detection(saved_backends):
    classifier = ClipColorClassifier.from_pretrained(str(saved_backends / "clip"))
    detections = [det("cup", box=(0, 0, 30, 20)), det("dog", box=(10, 10, 60, 40))]
    colors = classifier.classify(random_image(1), detections)
    assert len(colors) == 2 and set(colors) <= set(GENEVAL_COLORS)
    assert classifier.classify(random_image(1), []) == []
    embeddings = classifier._color_embeddings("cup")
    assert embeddings.shape == (len(GENEVAL_COLORS), 8)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(GENEVAL_COLORS)))


@pytest.mark.parametrize("mode", ["strict", "partial"])
def test_backend_end_to_end(saved_backends, mode):
    detector = TransformersDetector.from_pretrained(str(saved_backends / "detector"))
    car = GENEVAL_CLASSES.index("car")
    with torch.no_grad():  # make the random detector see confident cars, so colours get classified
        for layer in detector.model.model.decoder.class_embed:
            layer.bias.fill_(-10.0)
            layer.bias[car] = 10.0
    reward = GenEvalReward(detector, ClipColorClassifier.from_pretrained(str(saved_backends / "clip")), mode)
    metadata = [COLORS, COUNTING, POSITION]
    results = score_safely(reward, [random_image(seed) for seed in range(3)], metadata)
    assert len(results) == 3
    for result, record in zip(results, metadata):
        assert "error" not in result.details
        assert result.details["tag"] == record["tag"]
        json.dumps(result.details)
    cars = results[0]
    assert cars.details["found"] == {"car": 10}  # every query is a confident car
    if mode == "strict":  # enough cars: the top one's colour is read through CLIP
        assert cars.details["clauses"][0]["colors"][0] in GENEVAL_COLORS
        assert cars.reward == float(cars.details["correct"])
    else:  # ten cars for one: terms (1 - 9, 0)
        assert cars.reward == -4.0
