import itertools
import json
from pathlib import Path

import pytest

from gdro_ray.data.prompts import (
    GENEVAL_CLASSES,
    GENEVAL_TAGS,
    OCR_TEMPLATES,
    OCR_TEXTS,
    PromptRecord,
    geneval_prompt,
    geneval_stream,
    is_heldout,
    load_prompts,
    ocr_stream,
    read_prompt_file,
)
from gdro_ray.rewards.ocr import ocr_target

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GENEVAL_FILE = SHARED_DATA / "geneval_evaluation_metadata.jsonl"
FLOWGRPO_GENEVAL_FILE = SHARED_DATA / "flowgrpo_geneval_test_metadata.jsonl"
FLOWGRPO_OCR_FILE = SHARED_DATA / "flowgrpo_ocr_test.txt"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared benchmark prompt files not present")


def geneval_prompts(seed: int, n: int) -> list[PromptRecord]:
    return list(itertools.islice(geneval_stream(seed), n))


def ocr_prompts(seed: int, n: int) -> list[PromptRecord]:
    return list(itertools.islice(ocr_stream(seed), n))


def official_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row_shape(row: dict) -> tuple:
    """What a row's structure is, without its values: its keys, and each clause's keys."""
    return (
        tuple(row),
        tuple(tuple(clause) for clause in row["include"]),
        tuple(tuple(clause) for clause in row.get("exclude", [])),
    )


def as_geneval_row(record: PromptRecord) -> dict:
    return {**record.metadata, "prompt": record.prompt}


# ---- generated GenEval prompts ----


def test_generated_geneval_has_all_six_tags():
    records = geneval_prompts(seed=0, n=60)
    assert {record.metadata["tag"] for record in records} == set(GENEVAL_TAGS)


@needs_shared_data
def test_generated_geneval_rows_have_the_official_shapes():
    official = {}
    for row in official_rows(GENEVAL_FILE):
        official.setdefault(row["tag"], set()).add(row_shape(row))
    # The official file has one shape per tag, with keys in the same order as ours.
    assert all(len(shapes) == 1 for shapes in official.values())
    for record in geneval_prompts(seed=3, n=300):
        row = as_geneval_row(record)
        assert {row_shape(row)} == official[row["tag"]], row


def test_generated_geneval_values_follow_geneval_rules():
    for record in geneval_prompts(seed=1, n=600):
        meta = record.metadata
        include = meta["include"]
        assert all(clause["class"] in GENEVAL_CLASSES for clause in include)
        if meta["tag"] == "counting":
            (clause,) = include
            assert clause["count"] in (2, 3, 4)
            assert meta["exclude"] == [{"class": clause["class"], "count": clause["count"] + 1}]
        if meta["tag"] in ("colors", "color_attr"):
            assert all(clause["class"] != "person" for clause in include)
        if meta["tag"] in ("two_object", "position", "color_attr"):
            assert include[0]["class"] != include[1]["class"]
        if meta["tag"] == "color_attr":
            assert include[0]["color"] != include[1]["color"]
        if meta["tag"] == "position":
            assert include[1]["position"][0] in ("left of", "right of", "above", "below")
            assert include[1]["position"][1] == 0
        json.dumps(meta)  # serialisable as written


@needs_shared_data
def test_prompt_text_matches_geneval_for_every_official_row():
    # Articles ("an orange cup"), plurals ("two wine glasses") and the position word order, checked on
    # all 553 official rows and the 2,212 of Flow-GRPO's test file.
    for path in (GENEVAL_FILE, FLOWGRPO_GENEVAL_FILE):
        for row in official_rows(path):
            assert geneval_prompt(row) == row["prompt"]


def test_geneval_prompt_conventions():
    single = {"tag": "single_object", "include": [{"class": "apple", "count": 1}]}
    assert geneval_prompt(single) == "a photo of an apple"
    counting = {"tag": "counting", "include": [{"class": "clock", "count": 2}]}
    assert geneval_prompt(counting) == "a photo of two clocks"
    counting_bus = {"tag": "counting", "include": [{"class": "bus", "count": 3}]}
    assert geneval_prompt(counting_bus) == "a photo of three buses"
    position = {
        "tag": "position",
        "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    }
    assert geneval_prompt(position) == "a photo of a dog right of a teddy bear"


# ---- generated OCR prompts ----


def test_ocr_prompts_quote_their_text():
    records = ocr_prompts(seed=0, n=200)
    assert len({record.prompt for record in records}) == 200
    for record in records:
        assert ocr_target(record.prompt) == record.metadata["text"]
        assert record.metadata["text"] in OCR_TEXTS


def test_ocr_word_list_is_plain_and_has_no_repeats():
    assert len(OCR_TEXTS) >= 300
    assert len(set(OCR_TEXTS)) == len(OCR_TEXTS)
    assert all('"' not in text and text.strip() == text for text in OCR_TEXTS)


# ---- determinism ----


@pytest.mark.parametrize("generate", [geneval_prompts, ocr_prompts])
def test_generators_are_deterministic_and_prefix_stable(generate):
    assert generate(seed=5, n=50) == generate(seed=5, n=50)
    assert generate(seed=5, n=200)[:50] == generate(seed=5, n=50)
    assert generate(seed=5, n=50) != generate(seed=6, n=50)
    records = generate(seed=5, n=200)
    assert len({record.prompt_id for record in records}) == 200


def test_prompt_id_is_the_same_generated_or_read_from_a_file(tmp_path):
    geneval = geneval_prompts(seed=0, n=30)
    geneval_file = tmp_path / "geneval.jsonl"
    geneval_file.write_text("\n".join(json.dumps(as_geneval_row(record)) for record in geneval))
    assert read_prompt_file(geneval_file) == geneval
    ocr = ocr_prompts(seed=0, n=30)
    ocr_file = tmp_path / "ocr.txt"
    ocr_file.write_text("\n".join(record.prompt for record in ocr))
    assert read_prompt_file(ocr_file) == ocr


def test_a_set_that_runs_out_ends():
    every_ocr_prompt = len(OCR_TEXTS) * len(OCR_TEMPLATES)
    assert 0.9 * every_ocr_prompt <= len(list(ocr_stream(0))) <= every_ocr_prompt


# ---- splits ----


@pytest.mark.parametrize("task", ["geneval", "ocr"])
def test_splits_have_the_asked_size_never_overlap_and_are_stable(task):
    train = load_prompts(task, num_prompts=300, seed=0, split="train")
    heldout = load_prompts(task, num_prompts=40, seed=0, split="heldout")
    assert len(train) == 300 and len(heldout) == 40
    assert not {r.prompt_id for r in train} & {r.prompt_id for r in heldout}
    assert all(not is_heldout(r.prompt_id, 0, 0.1) for r in train)
    assert all(is_heldout(r.prompt_id, 0, 0.1) for r in heldout)
    assert load_prompts(task, num_prompts=300, seed=0, split="train") == train
    # Asking for more keeps the prompts already taken (a rerun with a larger set resumes).
    assert load_prompts(task, num_prompts=80, seed=0, split="heldout")[:40] == heldout
    # Another seed, another set and split.
    assert load_prompts(task, num_prompts=40, seed=1, split="heldout") != heldout


def test_heldout_fraction_sets_the_share_held_out():
    ids = [record.prompt_id for record in geneval_prompts(seed=0, n=2000)]
    assert 150 <= sum(is_heldout(prompt_id, 0, 0.1) for prompt_id in ids) <= 250
    assert 900 <= sum(is_heldout(prompt_id, 0, 0.5) for prompt_id in ids) <= 1100
    everything = load_prompts("geneval", num_prompts=400, seed=0, split="train", heldout_fraction=0.0)
    assert everything == geneval_prompts(0, 400)
    assert load_prompts("geneval", num_prompts=10, seed=0, split="heldout", heldout_fraction=0.0) == []


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown prompt task 'shapes'") as error:
        load_prompts("shapes", num_prompts=10, seed=0, split="train")
    for known in ("custom", "geneval", "ocr"):
        assert known in str(error.value)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="path="):
        load_prompts("custom", num_prompts=None, seed=0, split="train")
    with pytest.raises(ValueError, match="num_prompts="):
        load_prompts("ocr", num_prompts=None, seed=0, split="train")
    with pytest.raises(ValueError, match="split"):
        load_prompts("ocr", num_prompts=10, seed=0, split="test")
    with pytest.raises(ValueError, match="heldout_fraction"):
        load_prompts("ocr", num_prompts=10, seed=0, split="train", heldout_fraction=1.5)


# ---- reading the benchmarks' files ----


@needs_shared_data
@pytest.mark.parametrize("path, count", [(GENEVAL_FILE, 553), (FLOWGRPO_GENEVAL_FILE, 2212), (FLOWGRPO_OCR_FILE, 1018)])
def test_reads_the_real_files(path, count):
    records = read_prompt_file(path)
    assert len(records) == count


@needs_shared_data
def test_read_geneval_rows_keep_their_metadata():
    records = read_prompt_file(GENEVAL_FILE)
    assert [as_geneval_row(r) for r in records] == official_rows(GENEVAL_FILE)
    assert {r.metadata["tag"] for r in records} == set(GENEVAL_TAGS)


@needs_shared_data
def test_read_ocr_lines_carry_their_target():
    first = read_prompt_file(FLOWGRPO_OCR_FILE)[0]
    assert first.metadata == {"text": "Spring Collection 2024"}


@needs_shared_data
def test_custom_task_drops_repeats_and_splits_the_file():
    # Flow-GRPO's GenEval test file is GenEval's 553 prompts, four times each.
    train = load_prompts("custom", num_prompts=None, seed=0, split="train", path=FLOWGRPO_GENEVAL_FILE)
    heldout = load_prompts("custom", num_prompts=None, seed=0, split="heldout", path=FLOWGRPO_GENEVAL_FILE)
    assert len(train) + len(heldout) == 553
    official = read_prompt_file(GENEVAL_FILE)
    assert {r.prompt_id for r in train + heldout} == {r.prompt_id for r in official}


def test_custom_num_prompts_keeps_the_files_first_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f'A sign "word{i}"' for i in range(10)))
    first = load_prompts("custom", num_prompts=4, seed=0, split="train", path=path, heldout_fraction=0.0)
    assert [r.metadata["text"] for r in first] == ["word0", "word1", "word2", "word3"]
    everything = load_prompts("custom", num_prompts=100, seed=0, split="train", path=path, heldout_fraction=0.0)
    assert len(everything) == 10  # a file with fewer prompts gives them all


# ---- malformed files ----


def test_txt_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "ocr.txt"
    path.write_text('\nA sign "one"\n   \nA mug "two"\n')
    assert [r.metadata["text"] for r in read_prompt_file(path)] == ["one", "two"]


def test_txt_line_without_quotes_names_file_and_line(tmp_path):
    path = tmp_path / "ocr.txt"
    path.write_text('A sign "one"\n\nA sign with no quoted text\n')
    with pytest.raises(ValueError, match=r"ocr\.txt, line 3: .*quotes"):
        read_prompt_file(path)


VALID_ROW = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}


@pytest.mark.parametrize(
    "line, expected",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"tag": "single_object", "prompt": "a cat"}), r"missing key\(s\) \['include'\]"),
        (json.dumps({**VALID_ROW, "tag": "shapes"}), "one of .*single_object"),
        (json.dumps({**VALID_ROW, "include": []}), "non-empty list"),
        (json.dumps({**VALID_ROW, "include": [{"class": "cat"}]}), "class.*count"),
        (json.dumps({**VALID_ROW, "include": [{"class": "cat", "count": 0}]}), "count"),
        (json.dumps({**VALID_ROW, "exclude": {"class": "cat", "count": 2}}), "'exclude'"),
        (json.dumps({**VALID_ROW, "prompt": ""}), "'prompt'"),
    ],
)
def test_malformed_jsonl_names_file_line_and_expectation(tmp_path, line, expected):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps(VALID_ROW) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=r"meta\.jsonl, line 2: ") as error:
        read_prompt_file(path)
    assert error.match(expected)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_prompt_file(tmp_path / "nowhere.jsonl")


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_empty_file_is_an_error(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match=f"{name}: no prompts"):
        read_prompt_file(path)


def test_other_extension_is_an_error(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"prompts\.csv.*'\.jsonl', '\.txt'"):
        read_prompt_file(path)
