"""Prompt sets: generated GenEval-style and OCR prompts, readers for users' prompt files, and the
deterministic train / held-out split.

A prompt set is a generator function `seed -> Iterator[PromptRecord]` registered in PROMPT_SETS under its
task name: it yields distinct prompts in a fixed order for each seed, endlessly or until the set runs out.
`load_prompts` takes the first prompts of one split from it (or from a file, for "custom"), so asking for
more prompts later keeps the ones already taken.

GenEval's conventions (djghosh13/geneval, prompts/create_prompts.py) are followed exactly: the metadata of
a generated prompt, with its "prompt" added, is a row of GenEval's evaluation_metadata.jsonl.
"""

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gdro_ray.rewards.geneval import GENEVAL_CLASSES, GENEVAL_COLORS, GENEVAL_TAGS, POSITION_RELATIONS
from gdro_ray.rewards.ocr import ocr_target


@dataclass(frozen=True)
class PromptRecord:
    """One prompt. prompt_id is stable across runs (a hash of task kind, prompt and metadata), so reruns
    and the train / held-out split identify prompts by it. metadata is JSON-serialisable: GenEval's
    tag / include / exclude, or {"text": target} for OCR."""

    prompt_id: str
    prompt: str
    metadata: dict


def make_record(kind: str, prompt: str, metadata: dict) -> PromptRecord:
    """A record whose id hashes what the prompt asks for, so the same prompt from a generator or from a
    file gets the same id. kind: the reward the metadata is for ("geneval" or "ocr")."""
    key = json.dumps([kind, prompt, metadata], sort_keys=True)
    return PromptRecord(hashlib.sha256(key.encode()).hexdigest()[:16], prompt, metadata)


# ---- GenEval ----------------------------------------------------------------------------------------

# GenEval never asks for a coloured person.
COLOURABLE_CLASSES = tuple(name for name in GENEVAL_CLASSES if name != "person")
GENEVAL_COUNTS = (2, 3, 4)
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def with_article(word: str) -> str:
    """GenEval's article rule, by the first letter only: "an apple", "an orange cup", "a bench"."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(name: str) -> str:
    """GenEval's plural rule: "clocks", "buses" (and, by the same rule, "skises")."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def _clause_text(clause: dict) -> str:
    """How an include clause reads in a prompt: "a dog", "a red dog", "three dogs"."""
    noun = clause["class"] if "color" not in clause else f"{clause['color']} {clause['class']}"
    if clause["count"] == 1:
        return with_article(noun)
    return f"{NUMBER_WORDS[clause['count']]} {plural(noun)}"


def geneval_prompt(metadata: dict) -> str:
    """The prompt GenEval writes for this metadata (position: the second include clause is the object
    placed relative to the first)."""
    include = metadata["include"]
    if metadata["tag"] == "position":
        anchor, placed = include
        return f"a photo of {_clause_text(placed)} {placed['position'][0]} {_clause_text(anchor)}"
    return "a photo of " + " and ".join(_clause_text(clause) for clause in include)


def _draw_geneval_metadata(tag: str, rng: random.Random) -> dict:
    """One GenEval metadata record of the given tag, keys in GenEval's order."""
    if tag == "single_object":
        return {"tag": tag, "include": [{"class": rng.choice(GENEVAL_CLASSES), "count": 1}]}
    if tag == "two_object":
        first, second = rng.sample(GENEVAL_CLASSES, 2)
        return {"tag": tag, "include": [{"class": first, "count": 1}, {"class": second, "count": 1}]}
    if tag == "counting":
        name, count = rng.choice(GENEVAL_CLASSES), rng.choice(GENEVAL_COUNTS)
        # Exactly `count`: at least count (include) and fewer than count + 1 (exclude).
        return {
            "tag": tag,
            "include": [{"class": name, "count": count}],
            "exclude": [{"class": name, "count": count + 1}],
        }
    if tag == "colors":
        clause = {"class": rng.choice(COLOURABLE_CLASSES), "count": 1, "color": rng.choice(GENEVAL_COLORS)}
        return {"tag": tag, "include": [clause]}
    if tag == "position":
        placed, anchor = rng.sample(GENEVAL_CLASSES, 2)
        relation = rng.choice(POSITION_RELATIONS)
        # [relation, index of the clause it is relative to], as GenEval writes it.
        placed_clause = {"class": placed, "count": 1, "position": [relation, 0]}
        return {"tag": tag, "include": [{"class": anchor, "count": 1}, placed_clause]}
    if tag == "color_attr":
        names = rng.sample(COLOURABLE_CLASSES, 2)
        colours = rng.sample(GENEVAL_COLORS, 2)
        include = [{"class": name, "count": 1, "color": colour} for name, colour in zip(names, colours, strict=True)]
        return {"tag": tag, "include": include}
    raise ValueError(f"unknown GenEval tag {tag!r}; known: {GENEVAL_TAGS}")


def geneval_stream(seed: int) -> Iterator[PromptRecord]:
    """Distinct GenEval-style prompts, the six tags in turn (a tag whose prompts run out, such as the
    80 single objects, leaves its turns to the others)."""

    def draw(rng: random.Random, turn: int) -> PromptRecord:
        metadata = _draw_geneval_metadata(GENEVAL_TAGS[turn % len(GENEVAL_TAGS)], rng)
        return make_record("geneval", geneval_prompt(metadata), metadata)

    return _distinct_draws(draw, seed)


# ---- OCR ----------------------------------------------------------------------------------------------

# Our own plain words and short phrases for text rendering; each is at most a few words, as in
# Flow-GRPO's OCR prompts, and uses only letters, digits and spaces.
OCR_WORDS = tuple(
    """
    apple river garden window silver candle rocket forest island winter summer autumn spring harbor
    market bakery coffee library museum station theater castle bridge tunnel valley desert ocean planet
    comet meadow orchard lantern compass anchor saddle ladder hammer pencil marble velvet copper bronze
    golden crystal thunder breeze shadow sunrise sunset midnight morning evening journey voyage harvest
    festival parade circus carnival picnic holiday welcome hello thanks cheers bravo freedom wonder dream
    courage honest simple gentle brave clever happy lucky quiet bright fresh sweet spicy crispy frozen
    open closed sale exit entrance push pull stop slow yield caution danger notice private office kitchen
    lobby garage studio gallery cinema arcade diner pizza burger noodle bagel donut waffle pancake cookie
    muffin pretzel taco salad soup lemon mango cherry peach plum grape melon berry honey butter cheese
    pepper ginger mint basil olive tomato potato onion carrot pumpkin tiger zebra panda koala otter
    falcon eagle raven robin parrot dolphin whale shark turtle rabbit fox wolf bear lion horse pony
    kitten puppy dragon unicorn phoenix wizard knight pirate robot rocketship spaceship satellite orbit
    galaxy nebula cosmos atlas globe map north south east west center corner avenue street lane road
    highway airport ferry train subway taxi bicycle scooter tractor engine motor turbo diesel
    electric solar wind water fire earth stone wood paper glass steel iron clay sand snow rain storm
    cloud rainbow thunderbolt lightning sky moon star sun dawn dusk twilight noon calm peace hope joy
    love kind smile laugh play learn read write think create build paint draw sing dance jump run swim
    climb fly sail ride drive travel explore discover imagine believe inspire focus balance energy power
    magic mystery secret puzzle riddle treasure legend story chapter novel poem letter postcard ticket
    receipt invoice menu recipe label sticker badge medal trophy award prize winner champion hero
    captain pilot doctor nurse teacher student artist singer baker farmer miner sailor ranger
    camp cabin lodge hotel motel hostel inn tavern pub cafe bistro bar grill deli pantry cellar attic
    porch patio balcony rooftop terrace fountain statue tower lighthouse windmill barn stable chapel
    temple palace fortress village town city metro urban rustic vintage retro modern classic royal
    noble grand mega ultra super hyper prime alpha beta gamma delta omega zero one two three seven
    nine ten hundred thousand million first last next best fast tiny giant little big wild free
    """.split()
)
OCR_PHRASES = (
    "Good Morning", "Thank You", "Happy Birthday", "Welcome Home", "Grand Opening", "Fresh Bread",
    "Hot Coffee", "Open Late", "Keep Out", "No Parking", "Exit Only", "Staff Only", "Sold Out",
    "Best Seller", "Free Wifi", "Live Music", "Daily Specials", "Happy Hour", "Lost and Found",
    "Now Hiring", "Be Kind", "Stay Curious", "Dream Big", "Game Over", "Level Up", "Hello World",
    "Save the Date", "Just Married", "Home Sweet Home", "Good Luck", "Well Done", "See You Soon",
    "Under Construction", "Wet Paint", "Slow Down", "Pet Friendly", "Farm Fresh", "Est 1999",
    "Room 42", "Gate 7", "Platform 9", "Route 66", "Table 12", "Floor 3", "Aisle 5", "Dock 8",
    "Spring Sale", "Winter Market", "Summer Camp", "Autumn Fair", "Night Owl", "Early Bird",
    "Tea Time", "Book Club", "Art Show", "Fun Run", "Bake Sale", "Garage Sale", "Pizza Night",
    "Movie Night", "Open Mic", "Quiet Zone", "Low Battery", "Try Again", "You Win", "Top Secret",
)  # fmt: skip
OCR_TEXTS = OCR_WORDS + OCR_PHRASES

OCR_TEMPLATES = (
    'A wooden sign at the edge of a trail that says "{text}"',
    'A neon sign glowing in a shop window that reads "{text}"',
    'A white coffee mug printed with the words "{text}"',
    'A chalkboard on a cafe sidewalk with "{text}" written in chalk',
    'A hardcover book lying on a desk, its cover titled "{text}"',
    'A street banner hanging between two lampposts displaying "{text}"',
    'A birthday cake with "{text}" written in blue icing',
    'A plain T-shirt with "{text}" printed across the front',
    'A road sign on a quiet highway reading "{text}"',
    'A poster on a brick wall with the headline "{text}"',
)


def ocr_stream(seed: int) -> Iterator[PromptRecord]:
    """Distinct prompts asking for a word or short phrase of OCR_TEXTS, in double quotes, to be rendered."""

    def draw(rng: random.Random, _turn: int) -> PromptRecord:
        text = rng.choice(OCR_TEXTS)
        return make_record("ocr", rng.choice(OCR_TEMPLATES).format(text=text), {"text": text})

    return _distinct_draws(draw, seed)


# A set counts as run out after this many draws in a row bring no new prompt.
MAX_REPEATED_DRAWS = 1000


def _distinct_draws(draw: Callable[[random.Random, int], PromptRecord], seed: int) -> Iterator[PromptRecord]:
    """The new records among draws in turns 0, 1, 2, ... from a generator seeded with `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    repeats = 0
    for turn in itertools.count():
        record = draw(rng, turn)
        if record.prompt_id in seen:
            repeats += 1
            if repeats == MAX_REPEATED_DRAWS:
                return
            continue
        repeats = 0
        seen.add(record.prompt_id)
        yield record


# ---- Users' prompt files ----------------------------------------------------------------------------


def read_prompt_file(path: str | Path) -> list[PromptRecord]:
    """Prompts from a file, in file order, repeats kept.

    .txt: Flow-GRPO's OCR format, one prompt a line with the target text between its first pair of double
    quotes; blank lines are skipped. .jsonl: GenEval's evaluation_metadata format, one JSON object a line
    with "tag" (one of GENEVAL_TAGS), "include" (a non-empty list of {"class", "count"} clauses), optional
    "exclude" (a list of such clauses) and "prompt"; the other keys become the metadata.
    """
    path = Path(path)
    readers = {".txt": _read_ocr_line, ".jsonl": _read_geneval_line}
    if path.suffix not in readers:
        raise ValueError(f"{path}: unknown prompt file type {path.suffix!r}; expected one of {sorted(readers)}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    records = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(readers[path.suffix](line))
        except ValueError as error:
            raise ValueError(f"{path}, line {line_number}: {error}") from None
    if not records:
        raise ValueError(f"{path}: no prompts in file")
    return records


def _read_ocr_line(line: str) -> PromptRecord:
    prompt = line.strip()
    return make_record("ocr", prompt, {"text": ocr_target(prompt)})


def _read_geneval_line(line: str) -> PromptRecord:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object with tag, include and prompt, got {type(row).__name__}")
    missing = [key for key in ("tag", "include", "prompt") if key not in row]
    if missing:
        raise ValueError(f"missing key(s) {missing}; expected tag, include and prompt")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise ValueError(f"expected a non-empty string for 'prompt', got {row['prompt']!r}")
    if row["tag"] not in GENEVAL_TAGS:
        raise ValueError(f"expected 'tag' to be one of {list(GENEVAL_TAGS)}, got {row['tag']!r}")
    _check_clauses(row["include"], "include", allow_empty=False)
    _check_clauses(row.get("exclude", []), "exclude", allow_empty=True)
    metadata = {key: value for key, value in row.items() if key != "prompt"}
    return make_record("geneval", row["prompt"], metadata)


def _check_clauses(clauses, key: str, allow_empty: bool) -> None:
    size = "" if allow_empty else "non-empty "
    expected = f'\'{key}\' to be a {size}list of {{"class": str, "count": int >= 1}} objects'
    if not isinstance(clauses, list) or not (clauses or allow_empty):
        raise ValueError(f"expected {expected}, got {clauses!r}")
    for clause in clauses:
        valid = (
            isinstance(clause, dict)
            and isinstance(clause.get("class"), str)
            and isinstance(clause.get("count"), int)
            and not isinstance(clause.get("count"), bool)
            and clause["count"] >= 1
        )
        if not valid:
            raise ValueError(f"expected {expected}, got the clause {clause!r}")


# ---- Registry and split -----------------------------------------------------------------------------

PromptStream = Callable[[int], Iterator[PromptRecord]]
PROMPT_SETS: dict[str, PromptStream] = {"geneval": geneval_stream, "ocr": ocr_stream}
SPLITS = ("train", "heldout", "all")  # "all": every prompt, for a set used whole (an evaluation file)
PROMPT_FILE_KINDS = {".txt": "ocr", ".jsonl": "geneval"}  # which task's prompts a file holds, by its suffix


def prompt_file_kind(path: str | Path) -> str:
    """"ocr" for Flow-GRPO's one-prompt-a-line .txt files, "geneval" for GenEval's .jsonl metadata."""
    suffix = Path(path).suffix
    if suffix not in PROMPT_FILE_KINDS:
        raise ValueError(f"{path}: unknown prompt file type {suffix!r}; expected one of {sorted(PROMPT_FILE_KINDS)}")
    return PROMPT_FILE_KINDS[suffix]


def is_heldout(prompt_id: str, seed: int, heldout_fraction: float) -> bool:
    """Whether a prompt is held out: a hash of (seed, prompt_id) mapped to [0, 1) falls below the
    fraction. It depends on nothing else, so a prompt keeps its split whatever else is in the set."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def load_prompts(
    source: str | PromptStream,
    *,
    num_prompts: int | None,
    seed: int,
    split: str,
    path: str | Path | None = None,
    heldout_fraction: float = 0.1,
) -> list[PromptRecord]:
    """The first num_prompts prompts of one split of a task's prompts (all of them when the set has fewer,
    or when num_prompts is None, which only a file allows).

    source: a prompt stream, or its name in PROMPT_SETS, seeded with `seed`; or "custom", which reads `path` (see
    read_prompt_file; repeated prompts are kept once: Flow-GRPO's GenEval test file lists each four times).
    split: "train" or "heldout"; a prompt is held out by is_heldout, so the splits never overlap, hold about
    1 - heldout_fraction and heldout_fraction of the set, and asking for more prompts keeps those taken;
    "all" takes every prompt, in order.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    if num_prompts is not None and num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    if source == "custom":
        if path is None:
            raise ValueError("task 'custom' reads its prompts from a file: pass path=")
        records = _without_repeats(read_prompt_file(path))
    else:
        if isinstance(source, str) and source not in PROMPT_SETS:
            raise ValueError(f"unknown prompt task {source!r}; known: {sorted(PROMPT_SETS) + ['custom']}")
        if num_prompts is None:
            raise ValueError(f"prompt set {source!r} generates its prompts: pass num_prompts=")
        records = (PROMPT_SETS[source] if isinstance(source, str) else source)(seed)
    if split == "all":
        return list(itertools.islice(records, num_prompts))
    want_heldout = split == "heldout"
    if heldout_fraction == (0.0 if want_heldout else 1.0):
        return []  # an empty split: without this, an endless generator would be searched forever
    in_split = (record for record in records if is_heldout(record.prompt_id, seed, heldout_fraction) == want_heldout)
    return list(itertools.islice(in_split, num_prompts))


def _without_repeats(records: list[PromptRecord]) -> list[PromptRecord]:
    return list({record.prompt_id: record for record in records}.values())  # repeats are equal records
