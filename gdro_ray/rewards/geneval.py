"""GenEval's compositional reward: pure rules over detected objects, and the reward that runs them.

The rules follow GenEval's evaluator (Ghosh et al. 2023, djghosh13/geneval, `evaluation/evaluate_images.py`)
and Flow-GRPO's partial-credit training reward built on it (yifan123/reward-server,
`reward_server/gen_eval.py`). Here they are pure functions over `Detection`s, tested without any model.
The detector and the colour classifier sit behind two small interfaces; `geneval_backend.py` implements
them on transformers.

Metadata records are GenEval's: {"tag", "include": [{"class", "count", "color"?, "position"?: [relation,
index of an earlier include clause]}], "exclude"?: [{"class", "count"}], "prompt"}.
"""

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from gdro_ray.rewards.base import Reward, RewardResult

# The backend's default models (gdro_ray.rewards.geneval_backend), named here so that reading a reward spec
# imports no model library.
DEFAULT_DETECTOR_ID = "PekingU/rtdetr_r50vd_coco_o365"
DEFAULT_CLIP_ID = "openai/clip-vit-large-patch14"  # the weights of GenEval's open_clip ViT-L-14 "openai"

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
POSITION_RELATIONS = ("left of", "right of", "above", "below")
# GenEval's 80 COCO class names (its prompts/object_names.txt), in COCO's order.
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

CONFIDENCE_THRESHOLD = 0.3
# Counting prompts keep only near-certain detections: one doubtful extra box breaks an exact count.
COUNTING_CONFIDENCE_THRESHOLD = 0.9
MAX_OBJECTS_PER_CLASS = 16
POSITION_MARGIN = 0.1
MODES = ("strict", "partial")

Box = tuple[float, float, float, float]


@dataclass(eq=False)
class Detection:
    """One detected object: GenEval class name, confidence, (x0, y0, x1, y1) box in pixels, optional boolean
    HxW mask, and its colour when the detector knows it (otherwise a ColorClassifier names it)."""

    label: str
    score: float
    box: Box
    mask: np.ndarray | None = None
    color: str | None = None


class Detector(ABC):
    """Finds the objects in one image, labelled with GenEval's class names."""

    @abstractmethod
    def detect(self, image: Image.Image) -> list[Detection]:
        """Every detection with its score; the reward applies GenEval's thresholds itself."""


class ColorClassifier(ABC):
    """Names the colour of detected objects."""

    @abstractmethod
    def classify(self, image: Image.Image, detections: list[Detection]) -> list[str]:
        """One of GENEVAL_COLORS per detection, in order."""


# --- metadata ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clause:
    """`count` objects of class `label`; optionally all `color`; optionally each placed `relation` (e.g.
    "left of") every object of the include clause at index `target`."""

    label: str
    count: int
    color: str | None = None
    relation: str | None = None
    target: int | None = None


@dataclass(frozen=True)
class GenEvalTask:
    tag: str
    include: tuple[Clause, ...]
    exclude: tuple[Clause, ...] = ()


def parse_task(metadata: dict) -> GenEvalTask:
    """A GenEval metadata record as a task; ValueError naming the field on anything the rules cannot read."""
    tag = metadata.get("tag")
    if tag not in GENEVAL_TAGS:
        raise ValueError(f"GenEval metadata 'tag': expected one of {GENEVAL_TAGS}, got {tag!r}")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"GenEval metadata 'include': expected a non-empty list of clauses, got {include!r}")
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"GenEval metadata 'exclude': expected a list of clauses, got {exclude!r}")
    return GenEvalTask(
        tag=tag,
        include=tuple(_parse_clause(raw, f"include[{i}]", earlier_clauses=i) for i, raw in enumerate(include)),
        exclude=tuple(_parse_exclude_clause(raw, f"exclude[{i}]") for i, raw in enumerate(exclude)),
    )


def _parse_clause(raw: object, where: str, earlier_clauses: int) -> Clause:
    if not isinstance(raw, dict):
        raise ValueError(f"GenEval metadata '{where}': expected a dict with 'class' and 'count', got {raw!r}")
    label, count, color = raw.get("class"), raw.get("count"), raw.get("color")
    if not isinstance(label, str) or not label:
        raise ValueError(f"GenEval metadata '{where}.class': expected an object class name, got {label!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"GenEval metadata '{where}.count': expected a positive integer, got {count!r}")
    if color is not None and color not in GENEVAL_COLORS:
        raise ValueError(f"GenEval metadata '{where}.color': expected one of {GENEVAL_COLORS}, got {color!r}")
    if "position" not in raw:
        return Clause(label, count, color)
    position = raw["position"]
    if not isinstance(position, (list, tuple)) or len(position) != 2:
        raise ValueError(f"GenEval metadata '{where}.position': expected [relation, clause index], got {position!r}")
    relation, target = position
    if relation not in POSITION_RELATIONS:
        raise ValueError(
            f"GenEval metadata '{where}.position' relation: expected one of {POSITION_RELATIONS}, got {relation!r}"
        )
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < earlier_clauses:
        raise ValueError(
            f"GenEval metadata '{where}.position' target: expected the index of an earlier include clause "
            f"(0..{earlier_clauses - 1}), got {target!r}"
        )
    return Clause(label, count, color, relation, target)


def _parse_exclude_clause(raw: object, where: str) -> Clause:
    if isinstance(raw, dict) and set(raw) - {"class", "count"}:
        raise ValueError(f"GenEval metadata '{where}': expected only 'class' and 'count', got keys {sorted(raw)}")
    return _parse_clause(raw, where, earlier_clauses=0)


# --- rules --------------------------------------------------------------------------------------------


def confidence_threshold(tag: str) -> float:
    return COUNTING_CONFIDENCE_THRESHOLD if tag == "counting" else CONFIDENCE_THRESHOLD


def keep_confident(detections: Iterable[Detection], threshold: float) -> dict[str, list[Detection]]:
    """GenEval's filter: per class, the detections scoring above `threshold`, most confident first, at most
    MAX_OBJECTS_PER_CLASS of them. No NMS (GenEval's default overlap limit of 1.0 keeps every box)."""
    kept: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: d.score, reverse=True):
        if detection.score > threshold:
            same_class = kept.setdefault(detection.label, [])
            if len(same_class) < MAX_OBJECTS_PER_CLASS:
                same_class.append(detection)
    return kept


def relations(box: Box, reference: Box, margin: float = POSITION_MARGIN) -> set[str]:
    """Where `box` lies relative to `reference`, by GenEval's rule.

    The centre offset is shrunk on each axis by margin x (the two boxes' summed extents on that axis), so
    overlapping or nearly aligned objects have no relation on that axis. A relation holds where the shrunk
    offset, over the length of the unshrunk one, is beyond +-0.5. Image y grows downwards.
    """
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box, reference
    offset = ((ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2)
    extents = (abs(ax1 - ax0) + abs(bx1 - bx0), abs(ay1 - ay0) + abs(by1 - by0))
    shrunk = [math.copysign(max(abs(o) - margin * e, 0.0), o) for o, e in zip(offset, extents)]
    if all(abs(s) < 1e-3 for s in shrunk):
        return set()
    dx, dy = (s / math.hypot(*offset) for s in shrunk)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


@dataclass(frozen=True)
class ClauseCheck:
    """An include clause as checked: objects found of its class, the colours of its objects when checked,
    and what failed first: None, "count", "color", "no target" (its position target failed) or "position"."""

    clause: Clause
    found: int
    failed: str | None
    colors: tuple[str, ...] | None = None

    def details(self) -> dict:
        record = {"class": self.clause.label, "count": self.clause.count, "found": self.found, "failed": self.failed}
        if self.colors is not None:
            record["colors"] = list(self.colors)
        return record


def check_clauses(task: GenEvalTask, detected: dict[str, list[Detection]], exact_count: bool) -> list[ClauseCheck]:
    """Check each include clause in order, as GenEval does (at least `count` objects) or, with
    `exact_count`, as Flow-GRPO's training reward does (exactly `count`).

    Colour and position are judged on the clause's `count` most confident objects (`detected` is sorted,
    see keep_confident); every one must have the colour, and every one must stand in the relation to
    every object of the target clause, which must itself have passed.
    """
    checks: list[ClauseCheck] = []
    for clause in task.include:
        kept = detected.get(clause.label, [])
        objects = kept[: clause.count]
        colors = None
        if (len(kept) != clause.count) if exact_count else (len(kept) < clause.count):
            failed = "count"
        else:
            failed = None
            if clause.color is not None:
                colors = tuple(_color_of(d) for d in objects)
                if colors.count(clause.color) < clause.count:
                    failed = "color"
            if clause.relation is not None and failed is None:
                target = checks[clause.target]
                if target.failed is not None:
                    failed = "no target"
                else:
                    references = detected[target.clause.label][: target.clause.count]
                    if not all(clause.relation in relations(o.box, r.box) for o in objects for r in references):
                        failed = "position"
        checks.append(ClauseCheck(clause, len(kept), failed, colors))
    return checks


def _color_of(detection: Detection) -> str:
    if detection.color is None:
        raise ValueError(
            f"a colour clause needs the colour of a {detection.label!r} detection: give GenEvalReward a "
            "ColorClassifier, or use a detector that sets Detection.color"
        )
    return detection.color


def geneval_correct(task: GenEvalTask, detected: dict[str, list[Detection]]) -> tuple[bool, dict]:
    """GenEval's verdict: every include clause passes (at least `count` objects) and no exclude clause
    reaches its count (which makes counting prompts exact)."""
    checks = check_clauses(task, detected, exact_count=False)
    too_many = [
        {"class": clause.label, "limit": clause.count, "found": len(detected.get(clause.label, []))}
        for clause in task.exclude
        if len(detected.get(clause.label, [])) >= clause.count
    ]
    correct = all(check.failed is None for check in checks) and not too_many
    return correct, {"clauses": [check.details() for check in checks], "excluded_found": too_many}


def partial_credit(task: GenEvalTask, detected: dict[str, list[Detection]]) -> tuple[float, dict]:
    """Flow-GRPO's training reward: the mean of per-clause terms, with exact counts (exclude clauses unused).

    Per include clause: 1 - |count - found| / count (below 0 when over twice the count are found); then,
    if the count is wrong, one 0 for a colour or position part; else the fraction of its objects with the
    colour, and for a position checked 1 on success, 0 with no target, and 0 and 1 on failure (Flow-GRPO
    appends a 1 after a failed position too; kept so scores match its reward). A position is not checked
    after a colour failure. `exact_correct` is Flow-GRPO's "strict" accuracy: every clause passes.
    """
    checks = check_clauses(task, detected, exact_count=True)
    terms = [term for check in checks for term in _partial_terms(check)]
    details = {
        "exact_correct": all(check.failed is None for check in checks),
        "terms": terms,
        "clauses": [check.details() for check in checks],
    }
    return sum(terms) / len(terms), details


def _partial_terms(check: ClauseCheck) -> list[float]:
    clause = check.clause
    terms = [1.0 - abs(clause.count - check.found) / clause.count]
    if check.failed == "count":
        has_more_parts = clause.color is not None or clause.relation is not None
        return terms + [0.0] if has_more_parts else terms  # one 0 for colour and position together
    if check.colors is not None:
        terms.append(check.colors.count(clause.color) / clause.count)
    if clause.relation is not None and check.failed != "color":
        terms += {None: [1.0], "no target": [0.0], "position": [0.0, 1.0]}[check.failed]
    return terms


def objects_to_color(task: GenEvalTask, detected: dict[str, list[Detection]]) -> list[Detection]:
    """The detections the rules read a colour from: the `count` most confident of each colour clause's
    class, where at least that many were found."""
    chosen: dict[int, Detection] = {}
    for clause in task.include:
        kept = detected.get(clause.label, [])
        if clause.color is not None and len(kept) >= clause.count:
            chosen.update((id(d), d) for d in kept[: clause.count])
    return list(chosen.values())


def geneval_tag_accuracy(per_image: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """Accuracy per tag from (tag, correct) pairs."""
    outcomes: dict[str, list[bool]] = {}
    for tag, correct in per_image:
        if tag not in GENEVAL_TAGS:
            raise ValueError(f"unknown GenEval tag {tag!r}: expected one of {GENEVAL_TAGS}")
        outcomes.setdefault(tag, []).append(bool(correct))
    return {tag: sum(results) / len(results) for tag, results in outcomes.items()}


def geneval_overall(per_image: Iterable[tuple[str, bool]]) -> float:
    """GenEval's overall score: the mean over tags of per-tag accuracy (not the accuracy over all images,
    which would weight tags by their number of prompts)."""
    accuracy = geneval_tag_accuracy(per_image)
    if not accuracy:
        raise ValueError("no images to score")
    return sum(accuracy.values()) / len(accuracy)


# --- the reward -----------------------------------------------------------------------------------------


class GenEvalReward(Reward):
    """GenEval on detections: 1/0 per image in "strict" mode (GenEval's verdict), Flow-GRPO's partial
    credit in "partial" mode. Details always hold both GenEval's verdict and the partial credit."""

    name = "geneval"

    def __init__(self, detector: Detector, color_classifier: ColorClassifier | None, mode: str = "partial"):
        if mode not in MODES:
            raise ValueError(f"GenEval reward mode: expected one of {MODES}, got {mode!r}")
        self.detector = detector
        self.color_classifier = color_classifier
        self.mode = mode

    def score(self, images: list[Image.Image], metadata: list[dict]) -> list[RewardResult]:
        tasks = [parse_task(record) for record in metadata]  # bad metadata fails before any model runs
        return [self._score_one(image, task) for image, task in zip(images, tasks)]

    def _score_one(self, image: Image.Image, task: GenEvalTask) -> RewardResult:
        detected = keep_confident(self.detector.detect(image), confidence_threshold(task.tag))
        detected = self._with_colors(image, task, detected)
        correct, strict_details = geneval_correct(task, detected)
        credit, partial_details = partial_credit(task, detected)
        details = {
            "tag": task.tag,
            "correct": correct,
            "partial_credit": credit,
            "exact_correct": partial_details["exact_correct"],
            "found": {label: len(objects) for label, objects in detected.items()},
        }
        if self.mode == "strict":
            return RewardResult(float(correct), details | strict_details)
        return RewardResult(credit, details | {k: partial_details[k] for k in ("terms", "clauses")})

    def _with_colors(
        self, image: Image.Image, task: GenEvalTask, detected: dict[str, list[Detection]]
    ) -> dict[str, list[Detection]]:
        """`detected` with colours named for the detections the rules will read a colour from."""
        uncolored = [d for d in objects_to_color(task, detected) if d.color is None]
        if not uncolored or self.color_classifier is None:
            return detected  # without a classifier, a colour clause fails loudly in _color_of
        colors = self.color_classifier.classify(image, uncolored)
        if len(colors) != len(uncolored) or any(c not in GENEVAL_COLORS for c in colors):
            raise ValueError(f"colour classifier gave {colors!r} for {len(uncolored)} detections")
        colored = {id(d): dataclasses.replace(d, color=c) for d, c in zip(uncolored, colors)}
        return {label: [colored.get(id(d), d) for d in objects] for label, objects in detected.items()}
