"""Shapes scenes: a GenEval world of squares, circles and triangles in four colours, 32x32 pixels.

Prompts and metadata follow GenEval exactly (its six tags, its templates, its metadata format), with
SHAPE_CLASSES in place of COCO's classes, so the GenEval rules score them unchanged. A scene is drawn
from metadata alone: every clause's count, colour and relative position holds in the render.
"""

import random
from collections.abc import Iterator

from PIL import Image, ImageDraw

from gdro_ray.data.prompts import PromptRecord, geneval_prompt, make_record
from gdro_ray.rewards.geneval import GENEVAL_TAGS, relations

IMAGE_SIZE = 32
SHAPE_CLASSES = ("square", "circle", "triangle")
SHAPE_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
BACKGROUND = (255, 255, 255)
COUNTS = (2, 3, 4)
RELATIONS = ("left of", "right of", "above", "below")


def shapes_metadata(tag: str, rng: random.Random) -> dict:
    """GenEval metadata of one prompt of ``tag`` over the shapes world."""
    shape, other = rng.sample(SHAPE_CLASSES, 2)
    color, other_color = rng.sample(sorted(SHAPE_COLORS), 2)
    if tag == "single_object":
        return {"tag": tag, "include": [{"class": shape, "count": 1}]}
    if tag == "two_object":
        return {"tag": tag, "include": [{"class": shape, "count": 1}, {"class": other, "count": 1}]}
    if tag == "counting":
        count = rng.choice(COUNTS)
        return {"tag": tag, "include": [{"class": shape, "count": count}], "exclude": [{"class": shape, "count": count + 1}]}
    if tag == "colors":
        return {"tag": tag, "include": [{"class": shape, "count": 1, "color": color}]}
    if tag == "position":
        relation = rng.choice(RELATIONS)
        return {"tag": tag, "include": [{"class": other, "count": 1}, {"class": shape, "count": 1, "position": [relation, 0]}]}
    if tag == "color_attr":
        return {"tag": tag, "include": [{"class": shape, "count": 1, "color": color},
                                        {"class": other, "count": 1, "color": other_color}]}
    raise ValueError(f"unknown GenEval tag {tag!r}; known: {GENEVAL_TAGS}")


def shapes_stream(seed: int) -> Iterator[PromptRecord]:
    """Distinct shapes prompts, the six tags in turn, until the (small) world runs out."""
    rng, seen, misses, turn = random.Random(seed), set(), 0, 0
    while misses < 500:
        metadata = shapes_metadata(GENEVAL_TAGS[turn % len(GENEVAL_TAGS)], rng)
        turn += 1
        prompt = geneval_prompt(metadata)
        if prompt in seen:
            misses += 1
            continue
        seen.add(prompt)
        misses = 0
        yield make_record("geneval", prompt, metadata)


def render_shapes(metadata: dict, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """A scene that satisfies every include clause of ``metadata`` (exact counts, colours, positions)."""
    for _ in range(100):  # a layout can paint itself into a corner (an anchor at the edge): start again
        layout = _layout(metadata, rng, size)
        if layout is not None:
            break
    else:
        raise ValueError(f"could not lay out {metadata} in a {size}px scene")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape, box, color in layout:
        _draw_shape(draw, shape, box, SHAPE_COLORS[color or rng.choice(sorted(SHAPE_COLORS))])
    return image


def _layout(metadata: dict, rng: random.Random, size: int):
    """(shape, box, colour) for every object, or None when this attempt found no room."""
    placed, first_box_of_clause = [], []
    for clause in metadata["include"]:
        for index in range(clause["count"]):
            anchor = None
            if "position" in clause and index == 0:
                relation, target = clause["position"]
                anchor = (relation, first_box_of_clause[target])
            box = _free_box([box for _, box, _ in placed], anchor, rng, size)
            if box is None:
                return None
            placed.append((clause["class"], box, clause.get("color")))
            if index == 0:
                first_box_of_clause.append(box)
    return placed


def _free_box(taken, anchor, rng: random.Random, size: int):
    """A box clear of the others by a pixel, and, for a position clause, in the asked relation."""
    for _ in range(200):
        side = rng.randint(8, 11)
        x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
        box = (x0, y0, x0 + side, y0 + side)
        if any(_overlap(box, other) for other in taken):
            continue
        if anchor is not None and anchor[0] not in relations(box, anchor[1]):
            continue
        return box
    return None


def _overlap(a, b, gap: int = 1) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPE_CLASSES}")
