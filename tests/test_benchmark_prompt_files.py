"""Training and evaluating on the published prompt files: GenEval's 553 evaluation prompts, Flow-GRPO's OCR
and GenEval test sets (read from ../shared/data, never copied into the project)."""

import pytest

from gdro_ray.align import generation_config
from gdro_ray.evaluate import HeldOut
from gdro_ray.generation import GenerationConfig
from gdro_ray.profiles import profile_for

from test_prompts import FLOWGRPO_GENEVAL_FILE, FLOWGRPO_OCR_FILE, GENEVAL_FILE, needs_shared_data

pytestmark = needs_shared_data


def test_an_evaluation_file_is_evaluated_whole_and_recorded_by_hash():
    held_out = HeldOut.of_task("geneval", "tiny", eval_prompt_file=str(GENEVAL_FILE))
    prompts = held_out.prompts(None)
    assert len(prompts) == 553 and held_out.split == "all"  # GenEval's official prompts, every one
    assert held_out.prompts(10) == prompts[:10]
    record = held_out.record(len(prompts))
    assert record["prompt_file"]["name"] == GENEVAL_FILE.name and len(record["prompt_file"]["sha256"]) == 16
    # Flow-GRPO's GenEval test file lists each prompt four times: evaluated once each.
    test_set = HeldOut.of_task("geneval", "tiny", eval_prompt_file=str(FLOWGRPO_GENEVAL_FILE)).prompts(None)
    assert len({p.prompt_id for p in test_set}) == len(test_set)
    with pytest.raises(ValueError, match="holds geneval prompts, but the reward is 'ocr'"):
        HeldOut.of_task("ocr", "tiny", eval_prompt_file=str(GENEVAL_FILE))


def test_a_training_file_gives_the_dataset_its_prompts_and_its_hash():
    every = GenerationConfig(task="ocr", prompt_file=str(FLOWGRPO_OCR_FILE), split="all", num_prompts=0)
    lines = {line.strip() for line in FLOWGRPO_OCR_FILE.read_text().splitlines() if line.strip()}
    assert len(every.prompts()) == len(lines) and every.identity()["prompt_file"]["name"] == FLOWGRPO_OCR_FILE.name
    assert every.reward == profile_for("tiny").reward_spec("ocr")
    with pytest.raises(ValueError, match="holds ocr prompts, but the task is 'geneval'"):
        GenerationConfig(task="geneval", prompt_file=str(FLOWGRPO_OCR_FILE))


def test_the_align_job_takes_training_and_evaluation_files(load_script, tmp_path, capsys):
    align = load_script("jobs/align.py")
    train, settings = align.parse_args(["--task", "ocr", "--train-prompt-file", str(FLOWGRPO_OCR_FILE),
                                        "--eval-prompt-file", str(FLOWGRPO_OCR_FILE), "--eval-prompts", "0"])
    generation = generation_config(train, settings, tmp_path)
    assert generation.split == "all" and generation.prompt_file == str(FLOWGRPO_OCR_FILE)
    with pytest.raises(SystemExit):
        align.parse_args(["--task", "geneval", "--eval-prompt-file", str(FLOWGRPO_OCR_FILE)])
    assert "holds ocr prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        align.parse_args(["--task", "ocr", "--eval-prompts", "0"])  # all prompts: only of a file
    assert "eval_prompts must be >= 1" in capsys.readouterr().err
