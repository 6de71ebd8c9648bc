import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from gdro_ray.data.manifest import write_manifest
from gdro_ray.evaluate import (
    HeldOut,
    ImageScore,
    comparison_grid,
    format_table,
    generate_images,
    heldout_seeds,
    paired_change,
    score_images,
    summarise,
    write_results,
)
from gdro_ray.generation import GenerationConfig
from gdro_ray.models import SamplerSettings
from gdro_ray.profiles import profile_for, quality_judge
from gdro_ray.rewards import build_reward
from gdro_ray.rewards.brightness import BrightnessReward
from gdro_ray.tiny_world.judge import TinyWorldJudge


def test_summary_is_worked_out_by_hand():
    scores = [ImageScore("a", "p", "counting", 1, 1.0, 5.0), ImageScore("a", "p", "counting", 2, 0.0, 4.0),
              ImageScore("b", "q", "colors", 1, 0.5, 3.0), ImageScore("b", "q", "colors", 2, 0.5, 4.0)]
    summary = summarise(scores)
    # reward 0.5, u_hat 4.0, corrected 0.5 * (4 - 3) + 0.2 = 0.7
    assert summary["reward"] == 0.5 and summary["quality"] == 4.0
    assert summary["corrected"] == pytest.approx(0.7)
    assert summary["per_tag"] == {"colors": 0.5, "counting": 0.5} and summary["images"] == 4
    with pytest.raises(ValueError, match="no scored images"):
        summarise([])


def test_genevals_own_metric_is_the_mean_over_tags_of_strict_accuracy():
    scores = [ImageScore("a", "p", "counting", 1, 0.5, 4.0, True), ImageScore("a", "p", "counting", 2, 0.5, 4.0, False),
              ImageScore("b", "q", "colors", 1, 1.0, 4.0, True), ImageScore("c", "r", "colors", 1, 0.0, 4.0, None)]
    # counting 1/2, colors 1/1 (the image without a verdict, a failed scoring, stays out): overall 0.75, not 2/3
    geneval = summarise(scores)["geneval"]
    assert geneval == {"overall": 0.75, "per_tag": {"counting": 0.5, "colors": 1.0}, "images": 3}
    assert "geneval" not in summarise([ImageScore("a", "p", "ocr", 1, 0.5, 4.0)])
    summary = {"base": summarise(scores), "aligned": summarise(scores),
               "change": paired_change(scores, scores)}
    assert format_table(summary).splitlines()[0].split() == ["reward", "quality", "corrected", "GenEval"]
    assert format_table(summary).splitlines()[1].split()[-1] == "0.750"


def test_images_without_a_reward_are_counted_and_left_out_of_the_reward_means():
    base = [ImageScore("a", "p", "ocr", 1, 1.0, 4.0), ImageScore("a", "p", "ocr", 2, None, 2.0, error="TypeError"),
            ImageScore("a", "p", "ocr", 3, 0.0, 3.0)]
    aligned = [ImageScore("a", "p", "ocr", 1, 1.0, 4.0), ImageScore("a", "p", "ocr", 2, 0.9, 2.0),
               ImageScore("a", "p", "ocr", 3, 0.5, 3.0)]
    summary = summarise(base)
    assert summary["reward"] == 0.5 and summary["quality"] == 3.0  # the failed image is rated, not scored
    assert summary["unscored"] == 1 and summary["images"] == 3
    change = paired_change(base, aligned)
    assert change["reward"]["mean"] == pytest.approx(0.25) and change["reward_pairs"] == 2
    table = format_table({"base": summary, "aligned": summarise(aligned), "change": change})
    assert "no reward could be computed for 1 base and 0 aligned images" in table
    with pytest.raises(ValueError, match="none with a reward"):
        summarise([ImageScore("a", "p", "ocr", 1, None, 3.0)])


def test_paired_change_is_worked_out_by_hand():
    base = [ImageScore("a", "p", "ocr", seed, reward, 4.0) for seed, reward in enumerate([0.0, 0.5, 1.0])]
    aligned = [ImageScore("a", "p", "ocr", seed, reward, quality)
               for seed, reward, quality in zip(range(3), [1.0, 0.5, 1.0], [4.0, 3.0, 5.0])]
    change = paired_change(base, aligned)
    # reward differences 1, 0, 0: mean 1/3, sample variance 1/3, standard error sqrt(1/3 / 3) = 1/3
    assert change["reward"]["mean"] == pytest.approx(1 / 3) and change["reward"]["standard_error"] == pytest.approx(1 / 3)
    # quality differences 0, -1, 1: mean 0, sample variance 1, standard error sqrt(1/3)
    assert change["quality"]["mean"] == pytest.approx(0) and change["quality"]["standard_error"] == pytest.approx(3**-0.5)
    assert change["reward_changed"] == 1 and change["images"] == 3
    table = format_table({"base": summarise(base), "aligned": summarise(aligned), "change": change})
    assert "reward +0.333 +- 0.333" in table and "1 changed reward" in table

    with pytest.raises(ValueError, match="same prompts and seeds"):
        paired_change(base, aligned[::-1])
    with pytest.raises(ValueError, match="got 3 and 2 images"):
        paired_change(base, aligned[:2])
    with pytest.raises(ValueError, match="at least 2 images"):
        paired_change(base[:1], aligned[:1])


def test_every_part_of_a_mixed_reward_is_reported_beside_the_mix(tiny_flux, tmp_path):
    prompts = profile_for("tiny").prompts("ocr", split="heldout", num_prompts=2, seed=0)
    seeds = [[3, 4], [5, 6]]
    images = generate_images(tiny_flux, prompts, seeds, SamplerSettings(32, 32, num_steps=2))
    mix = build_reward(profile_for("tiny").reward_spec("ocr", None, {"name": "mix", "parts": {
        "text": {"name": "ocr", "weight": 1.0}, "light": {"name": "brightness", "weight": 0.5}}}))
    scores = score_images(mix, TinyWorldJudge(), prompts, seeds, images, task="ocr")
    summary = summarise(scores)
    for label, weight in (("text", 1.0), ("light", 0.5)):  # the mix's mean is the weighted parts' means
        assert summary["parts"][label] == pytest.approx(sum(s.parts[label] for s in scores) / 4)
    assert summary["reward"] == pytest.approx(summary["parts"]["text"] + 0.5 * summary["parts"]["light"])
    write_results(tmp_path, "base", scores, summary)
    with open(tmp_path / "base.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["part_light"]) for row in rows] == [s.parts["light"] for s in scores]
    # Aligned by hand: the light part up by 0.1 on every image, text unchanged.
    aligned = [replace(s, parts={**s.parts, "light": s.parts["light"] + 0.1}) for s in scores]
    change = paired_change(scores, aligned)
    assert change["parts"]["light"]["mean"] == pytest.approx(0.1) and change["parts"]["text"]["mean"] == 0
    table = format_table({"base": summary, "aligned": summarise(aligned), "change": change})
    assert f"part light: {summary['parts']['light']:.3f} -> {summary['parts']['light'] + 0.1:.3f}" in table


def test_every_held_out_image_has_its_own_seed_and_a_prompt_keeps_its_seeds():
    seeds = heldout_seeds(3, 4)
    assert [len(row) for row in seeds] == [4, 4, 4] and len({s for row in seeds for s in row}) == 12
    assert heldout_seeds(5, 4)[:3] == seeds  # asking for more prompts keeps the seeds of those taken


def test_generated_images_are_scored_written_and_pictured(tiny_flux, tmp_path):
    prompts = profile_for("tiny").prompts("geneval", split="heldout", num_prompts=2, seed=0)
    seeds, sampler = [[3, 4, 5], [6, 7, 8]], SamplerSettings(32, 32, num_steps=2)
    images = generate_images(tiny_flux, prompts, seeds, sampler)
    assert [len(row) for row in images] == [3, 3] and images[0][0].size == (32, 32)
    assert generate_images(tiny_flux, prompts[:1], seeds[:1], sampler)[0][1].tobytes() == images[0][1].tobytes()
    with pytest.raises(ValueError, match="one row per prompt: 2 prompts, 1 rows"):
        generate_images(tiny_flux, prompts, seeds[:1], sampler)

    scores = score_images(BrightnessReward(), TinyWorldJudge(), prompts, seeds, images, task="geneval")
    assert len(scores) == 6 and {s.tag for s in scores} <= {p.metadata["tag"] for p in prompts}
    assert all(0 <= s.reward <= 1 and 1 <= s.quality <= 5 for s in scores)
    write_results(tmp_path, "base", scores, summarise(scores))
    stored = json.loads((tmp_path / "base.json").read_text())
    assert stored["summary"]["images"] == 6 and len(stored["images"]) == 6
    with open(tmp_path / "base.csv") as handle:
        assert [float(row["reward"]) for row in csv.DictReader(handle)] == [s.reward for s in scores]

    texts = [p.prompt for p in prompts]
    grid = comparison_grid(images, images, texts, scale=2)
    label = grid.width - (2 * 3 * 32 + 16) * 2
    assert label > 0 and grid.height == 2 * 32 * 2
    for row in range(2):  # each row's label column holds its prompt's text: dark pixels on white
        assert grid.crop((0, row * 64, label, (row + 1) * 64)).convert("L").getextrema()[0] < 100
    with pytest.raises(ValueError, match="same prompts and seeds"):
        comparison_grid(images, images[:1], texts)
    with pytest.raises(ValueError, match="one prompt per row"):
        comparison_grid(images, images, texts[:1])


def test_the_evaluate_job_compares_base_and_aligned(tmp_path, capsys):
    import torch

    from gdro_ray.models import LoraSpec, load_flow_model

    sys_path = str(Path(__file__).resolve().parents[1] / "jobs")
    sys.path.insert(0, sys_path)
    import evaluate as evaluate_job

    model = load_flow_model(profile_for("tiny").weights)
    model.add_lora(LoraSpec(rank=4, alpha=4))
    with torch.no_grad():  # a LoRA that changes the model, as a trained one does
        for parameter in model.trainable_parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_lora(tmp_path / "lora")
    summary = evaluate_job.main(["--task", "geneval", "--lora", str(tmp_path / "lora"), "--eval-prompts", "2",
                                 "--images-per-prompt", "2", "--num-steps", "2", "--out", str(tmp_path / "eval")])
    assert set(summary) == {"base", "aligned", "change", "judge", "held_out"} and summary["base"]["images"] == 4
    assert summary["held_out"] == {"task": "geneval", "prompt_file": None, "split": "heldout", "prompts": 2}
    assert summary["judge"] == {"name": "TinyWorldJudge", "unparsed": 0}  # the judge behind the corrected score
    assert 0 <= summary["base"]["geneval"]["overall"] <= 1  # GenEval's metric, over the shapes detector
    assert summary["change"]["reward"]["mean"] == pytest.approx(summary["aligned"]["reward"] - summary["base"]["reward"])
    for name in ("base.json", "base.csv", "aligned.json", "aligned.csv", "summary.json", "comparison.png"):
        assert (tmp_path / "eval" / name).is_file()
    # The LoRA is really applied: the aligned half of the picture differs from the base half.
    grid = Image.open(tmp_path / "eval" / "comparison.png")
    block = 2 * 32 * 4  # two images per prompt, scaled 4x
    base_block = grid.crop((grid.width - 2 * block - 16 * 4, 0, grid.width - block - 16 * 4, grid.height))
    assert base_block.tobytes() != grid.crop((grid.width - block, 0, grid.width, grid.height)).tobytes()
    written = (tmp_path / "eval" / "summary.json").stat().st_mtime_ns
    again = evaluate_job.main(["--task", "geneval", "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "eval")])
    assert again == summary and (tmp_path / "eval" / "summary.json").stat().st_mtime_ns == written  # read back
    with pytest.raises(ValueError, match="needs a quality judge"):
        quality_judge("black-forest-labs/FLUX.1-dev")
    with pytest.raises(SystemExit):
        evaluate_job.main(["--lora", str(tmp_path / "missing")])
    assert "--lora must be a LoRA directory" in capsys.readouterr().err


def test_a_dataset_is_evaluated_with_its_own_reward_sampler_and_prompt_file(tmp_path):
    """The held-out evaluation of a dataset reads what it was made with from its manifest."""
    prompt_file = tmp_path / "signs.txt"
    prompt_file.write_text("\n".join(f'a sign that says "{word}"' for word in ("KEY", "MAP", "CAT", "ANT", "HEN",
                                                                                "RAY", "YAK", "TEA", "EAR", "ARC")))
    config = GenerationConfig(task="custom", prompt_file=str(prompt_file), num_prompts=0, reward={"min_side": 128},
                              seed=3, sampler=SamplerSettings(32, 32, num_steps=5, cfg_scale=2.0),
                              out=str(tmp_path / "g"))
    (tmp_path / "g").mkdir()
    write_manifest(tmp_path / "g", config.identity(), {}, complete=True, prompt_file=config.prompt_file)
    held_out = HeldOut.of_dataset(tmp_path / "g")
    assert held_out.reward == {**profile_for("tiny").rewards["ocr"], "min_side": 128}
    assert held_out.sampler == config.sampler and held_out.seed == 3 and held_out.task == "custom"
    every_prompt = held_out.prompts(None) + config.prompts()
    assert len(held_out.prompts(None)) >= 1 and len(every_prompt) == 10  # the file's held-out split, and the rest
    prompt_file.write_text(prompt_file.read_text() + '\na sign that says "OWL"')
    with pytest.raises(ValueError, match="changed since the dataset"):
        HeldOut.of_dataset(tmp_path / "g")
    prompt_file.unlink()
    with pytest.raises(FileNotFoundError, match="no longer there"):
        HeldOut.of_dataset(tmp_path / "g")
