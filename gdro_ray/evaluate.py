"""Held-out evaluation: the same prompts and seeds through a base and an aligned model, scored by the
task reward and a quality judge, summarised with the GDRO paper's corrected score and the paired change
from base to aligned (with standard errors), and pictured.

    corrected = r_mean * (u_hat - 3) + 0.2      (u_hat: the judge's mean 1-5 rating)
"""

import csv
import json
import textwrap
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from gdro_ray.console import StageProgress
from gdro_ray.data.manifest import file_identity, read_dataset_manifest
from gdro_ray.data.prompts import PromptRecord, prompt_file_kind
from gdro_ray.data.records import tensor_to_image
from gdro_ray.models import FlowModel, PromptEmbeddings, SamplerSettings, load_flow_model
from gdro_ray.profiles import profile_for
from gdro_ray.rewards import build_reward
from gdro_ray.rewards.base import Reward, score_safely
from gdro_ray.rewards.geneval import geneval_overall, geneval_tag_accuracy
from gdro_ray.rewards.quality import QualityJudge, corrected_score


HELDOUT_SEEDS_START = 10_000  # sampling seeds of held-out evaluations, far from the datasets' derived seeds
GRID_PROMPTS, GRID_IMAGES_PER_PROMPT = 16, 8  # comparison.png: the first prompts' first images, base beside aligned


def heldout_seeds(num_prompts: int, images_per_prompt: int) -> list[list[int]]:
    """The sampling seeds of a held-out evaluation, one row per prompt, and a seed no other image shares.

    A model that draws much from its noise draws alike images for every prompt given one seed; with seeds
    shared between prompts a mean reward then rests on a few noise draws (an earlier tiny shapes base scored 0.12
    to 0.26 on four sets of 8 shared seeds). Prompt i keeps its seeds whatever the number of prompts.
    """
    first = HELDOUT_SEEDS_START
    return [[first + i * images_per_prompt + j for j in range(images_per_prompt)] for i in range(num_prompts)]


@dataclass(frozen=True)
class HeldOut:
    """What an evaluation draws and how it scores: the held-out split of a task's prompts or of a prompt file
    (split "all": the whole of an evaluation file) for a model, sampled with `sampler` and scored with the
    reward spec `reward`. Read from a group dataset's manifest, it is what the dataset was made with."""

    task: str
    model: str
    seed: int
    sampler: SamplerSettings
    reward: dict
    prompt_file: str | None = None
    split: str = "heldout"

    @classmethod
    def of_task(cls, task: str, model: str, seed: int = 0, sampler: SamplerSettings | None = None,
                eval_prompt_file: str | None = None) -> "HeldOut":
        """The model's own defaults for a task; with an evaluation file, all of its prompts."""
        profile = profile_for(model)
        held_out = cls(task, model, seed, sampler or profile.sampler, profile.reward_spec(task))
        return held_out.on_file(eval_prompt_file) if eval_prompt_file else held_out

    @classmethod
    def of_dataset(cls, directory: str | Path, eval_prompt_file: str | None = None) -> "HeldOut":
        """The prompts, sampler and reward a group dataset was made with (prompts: all of an evaluation file's
        instead, when one is given)."""
        manifest = read_dataset_manifest(directory)
        identity, prompt_file = manifest["identity"], manifest.get("prompt_file")
        if identity["prompt_file"] is not None:
            if not (prompt_file and Path(prompt_file).is_file()):
                raise FileNotFoundError(f"the dataset in {str(directory)!r} was made from the prompt file "
                                        f"{prompt_file!r}, which is no longer there")
            if file_identity(prompt_file) != identity["prompt_file"]:
                raise ValueError(f"the prompt file {prompt_file!r} changed since the dataset in {str(directory)!r} "
                                 "was made from it: its held-out split would be another")
        sampler = SamplerSettings.from_dict(identity["sampler"])
        held_out = cls(identity["task"], identity["model"], identity["seed"], sampler, identity["reward"], prompt_file)
        return held_out.on_file(eval_prompt_file) if eval_prompt_file else held_out

    def on_file(self, eval_prompt_file: str) -> "HeldOut":
        """The same evaluation over all the prompts of an evaluation file (GenEval's evaluation_metadata.jsonl,
        Flow-GRPO's test files), which must hold the prompts the reward scores."""
        if not Path(eval_prompt_file).is_file():
            raise FileNotFoundError(f"evaluation prompt file {eval_prompt_file!r} does not exist")
        if prompt_file_kind(eval_prompt_file) != self.reward["name"]:
            raise ValueError(f"evaluation prompt file {eval_prompt_file!r} holds {prompt_file_kind(eval_prompt_file)} "
                             f"prompts, but the reward is {self.reward['name']!r}")
        task = self.task if self.task != "custom" else prompt_file_kind(eval_prompt_file)
        return replace(self, task=task, prompt_file=str(Path(eval_prompt_file).resolve()), split="all")

    def prompts(self, num_prompts: int | None) -> list[PromptRecord]:
        """The first num_prompts of them (None: all, from a file)."""
        return profile_for(self.model).prompts(self.task, split=self.split, num_prompts=num_prompts, seed=self.seed,
                                               prompt_file=self.prompt_file)

    def record(self, prompts: int) -> dict:
        """What the evaluation drew, for its summary: the source (a file by name and hash), split and count."""
        return {"task": self.task, "prompt_file": file_identity(self.prompt_file), "split": self.split,
                "prompts": prompts}


@dataclass
class ImageScore:
    prompt_id: str
    prompt: str
    tag: str  # the GenEval tag, or the task name for prompts without one
    seed: int
    reward: float | None  # None: the reward could not be computed for this image
    quality: float
    correct: bool | None = None  # GenEval's strict verdict on the image, for rewards that give one
    error: str = ""  # why no reward could be computed, if none was
    parts: dict[str, float | None] | None = None  # a mixed reward's parts (gdro_ray.rewards.mixture)


def generate_images(model: FlowModel, prompts: list[PromptRecord], seeds: list[list[int]], sampler: SamplerSettings,
                    embeddings: PromptEmbeddings | None = None, unconditional: PromptEmbeddings | None = None,
                    progress: StageProgress | None = None) -> list[list[Image.Image]]:
    """One row of images per prompt, one image per seed of its row of `seeds` (embeddings: the prompts', and
    unconditional: the empty prompt's, if already encoded; progress: advanced by each prompt done)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds must hold one row per prompt: {len(prompts)} prompts, {len(seeds)} rows")
    embeddings = embeddings if embeddings is not None else model.encode_prompts([p.prompt for p in prompts])
    rows = []
    for index, prompt_seeds in enumerate(seeds):
        group = model.generate(embeddings.select([index]), prompt_seeds, sampler, unconditional)
        rows.append([tensor_to_image(image) for image in group.images])
        if progress is not None:
            progress.advance()
    return rows


def score_images(reward: Reward, judge: QualityJudge, prompts: list[PromptRecord], seeds: list[list[int]],
                 images: list[list[Image.Image]], task: str) -> list[ImageScore]:
    scores = []
    for prompt, prompt_seeds, row in zip(prompts, seeds, images, strict=True):
        metadata = [{**prompt.metadata, "prompt": prompt.prompt}] * len(row)
        rewards = score_safely(reward, row, metadata)
        ratings = judge.rate(row, metadata)
        tag = prompt.metadata.get("tag", task)
        for seed, result, rating in zip(prompt_seeds, rewards, ratings, strict=True):
            error = result.details.get("error", "") if result.reward is None else ""
            scores.append(ImageScore(prompt.prompt_id, prompt.prompt, tag, seed, result.reward, rating,
                                     result.details.get("correct"), error, result.details.get("parts")))
    return scores


def summarise(scores: list[ImageScore]) -> dict:
    """Mean reward, mean quality (u_hat), corrected score, and the mean reward per tag; on GenEval prompts
    also GenEval's own metric: strict correctness per tag and its overall score, the mean over tags. Images
    whose reward could not be computed are counted (unscored) and left out of the reward's means."""
    scored = [s for s in scores if s.reward is not None]
    if not scored:
        raise ValueError(f"no scored images to summarise ({len(scores)} images, none with a reward)")
    reward = _mean([s.reward for s in scored])
    quality = _mean([s.quality for s in scores])
    tags = sorted({s.tag for s in scored})
    per_tag = {tag: _mean([s.reward for s in scored if s.tag == tag]) for tag in tags}
    summary = {"reward": reward, "quality": quality, "corrected": corrected_score(reward, quality),
               "per_tag": per_tag, "images": len(scores), "unscored": len(scores) - len(scored)}
    verdicts = [(s.tag, s.correct) for s in scores if s.correct is not None]
    if verdicts:  # images whose scoring failed have no verdict and stay out
        summary["geneval"] = {"overall": geneval_overall(verdicts), "per_tag": geneval_tag_accuracy(verdicts),
                              "images": len(verdicts)}
    labels = _part_labels(scores)
    if labels:  # a mixed reward: each part's mean beside the mix's, over the images where it was scored
        values = {label: [s.parts[label] for s in scores if (s.parts or {}).get(label) is not None] for label in labels}
        summary["parts"] = {label: _mean(scored) if scored else None for label, scored in values.items()}
    return summary


def _part_labels(scores: list[ImageScore]) -> list[str]:
    return list(dict.fromkeys(label for s in scores for label in (s.parts or {})))


def paired_change(base: list[ImageScore], aligned: list[ImageScore]) -> dict:
    """Aligned minus base, image by image over the same prompts and seeds: the mean change of the reward and of
    the judge's rating, each with its standard error, and how many images changed reward. Pairing removes the
    spread between prompts, so a gain of about two standard errors is one that more images would keep."""
    if len(base) != len(aligned):
        raise ValueError(f"base and aligned scores must pair up, got {len(base)} and {len(aligned)} images")
    pairs = list(zip(base, aligned))
    if any((b.prompt_id, b.seed) != (a.prompt_id, a.seed) for b, a in pairs):
        raise ValueError("base and aligned scores must come from the same prompts and seeds, in the same order")
    if len(pairs) < 2:
        raise ValueError(f"a paired change needs at least 2 images, got {len(pairs)}")

    def mean_and_error(differences: list[float]) -> dict:
        mean, error = mean_and_standard_error(differences)
        return {"mean": mean, "standard_error": error}

    scored = [(b, a) for b, a in pairs if b.reward is not None and a.reward is not None]  # both with a reward
    if len(scored) < 2:
        raise ValueError(f"a paired change needs at least 2 images scored on both sides, got {len(scored)}")
    change = {"reward": mean_and_error([a.reward - b.reward for b, a in scored]),
              "quality": mean_and_error([a.quality - b.quality for b, a in pairs]),
              "reward_changed": sum(a.reward != b.reward for b, a in scored), "images": len(pairs),
              "reward_pairs": len(scored)}
    labels = _part_labels(base + aligned)
    for label in labels:  # each part of a mixed reward, over the pairs where both sides have it
        differences = [a.parts[label] - b.parts[label] for b, a in pairs
                       if None not in ((b.parts or {}).get(label), (a.parts or {}).get(label))]
        if len(differences) >= 2:
            change.setdefault("parts", {})[label] = mean_and_error(differences)
    return change


def mean_and_standard_error(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (None from a single value)."""
    mean = _mean(values)
    if len(values) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def write_results(directory: str | Path, name: str, scores: list[ImageScore], summary: dict) -> None:
    """NAME.json (summary and every image's scores) and NAME.csv (one row per image)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records = [asdict(s) for s in scores]
    (directory / f"{name}.json").write_text(json.dumps({"summary": summary, "images": records}, indent=2))
    # The CSV has a column per part of a mixed reward.
    write_csv([{**{k: v for k, v in record.items() if k != "parts"},
                **{f"part_{label}": value for label, value in (record["parts"] or {}).items()}} for record in records],
              directory / f"{name}.csv")


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Rows as a CSV file with a header of every key, in the order first seen (a row without one leaves it empty)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)


LABEL_WIDTH = 36  # characters of prompt text per line of a row's label


def comparison_grid(base: list[list[Image.Image]], aligned: list[list[Image.Image]], prompts: list[str],
                    scale: int = 4) -> Image.Image:
    """One row per prompt: its text, the base model's images, a gap, the aligned model's from the same seeds."""
    if len(base) != len(aligned) or any(len(a) != len(b) for a, b in zip(base, aligned)):
        raise ValueError("base and aligned images must come from the same prompts and seeds")
    if len(prompts) != len(base):
        raise ValueError(f"one prompt per row: {len(base)} rows, {len(prompts)} prompts")
    width, height = base[0][0].size
    columns, gap, row_height = len(base[0]), width // 2 * scale, height * scale
    font = ImageFont.load_default(size=max(10, row_height // 9))
    label = int(font.getlength("x" * LABEL_WIDTH)) + 8
    grid = Image.new("RGB", (label + 2 * columns * width * scale + gap, len(base) * row_height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, (prompt, left, right) in enumerate(zip(prompts, base, aligned)):
        draw.multiline_text((4, row * row_height + 4), "\n".join(textwrap.wrap(prompt, LABEL_WIDTH)[:8]),
                            fill=(0, 0, 0), font=font)
        for column, image in enumerate(left + right):
            x = label + column * width * scale + (gap if column >= columns else 0)
            grid.paste(image.resize((width * scale, row_height), Image.NEAREST), (x, row * row_height))
    middle = label + columns * width * scale + gap // 2
    draw.line([middle, 0, middle, grid.height], fill=(128, 128, 128), width=max(1, scale // 2))
    return grid


def format_table(summary: dict) -> str:
    """Base and aligned side by side (with GenEval's overall score on GenEval prompts), then the change."""
    geneval = "geneval" in summary["base"]
    lines = [f"{'':10}{'reward':>8}{'quality':>9}{'corrected':>11}" + (f"{'GenEval':>9}" if geneval else "")]
    lines += [f"{name:10}{summary[name]['reward']:>8.3f}{summary[name]['quality']:>9.2f}"
              f"{summary[name]['corrected']:>11.3f}"
              + (f"{summary[name]['geneval']['overall']:>9.3f}" if geneval else "") for name in ("base", "aligned")]
    change = summary["change"]
    reward, quality = change["reward"], change["quality"]
    lines.append(f"change: reward {reward['mean']:+.3f} +- {reward['standard_error']:.3f}, quality "
                 f"{quality['mean']:+.2f} +- {quality['standard_error']:.2f} (paired over {change['images']} "
                 f"images, +- one standard error; {change['reward_changed']} changed reward)")
    for label, part in change.get("parts", {}).items():
        before, after = summary["base"]["parts"][label], summary["aligned"]["parts"][label]
        lines.append(f"  part {label}: {before:.3f} -> {after:.3f}, change {part['mean']:+.3f} +- "
                     f"{part['standard_error']:.3f}")
    judge = summary.get("judge")
    if judge:
        lines.append(f"judge: {judge['name']}" + (f"; {judge['unparsed']} answers held no rating and were rated 3"
                                                  if judge["unparsed"] else ""))
    unscored = {name: summary[name].get("unscored", 0) for name in ("base", "aligned")}
    if any(unscored.values()):
        lines.append(f"no reward could be computed for {unscored['base']} base and {unscored['aligned']} aligned "
                     "images: left out of the reward's means (their errors are in base.json and aligned.json)")
    return "\n".join(lines)


def evaluation_draw(held_out: HeldOut, num_prompts: int | None, images_per_prompt: int
                    ) -> tuple[list[PromptRecord], list[list[int]]]:
    """The prompts (the first num_prompts; None: all of a file's) and the seeds of a final evaluation."""
    prompts = held_out.prompts(num_prompts)
    if not prompts:
        raise ValueError(f"no held-out prompts for task {held_out.task!r} (prompt file: {held_out.prompt_file})")
    return prompts, heldout_seeds(len(prompts), images_per_prompt)


def sample_and_score(model: FlowModel, held_out: HeldOut, reward: Reward, judge: QualityJudge,
                     prompts: list[PromptRecord], seeds: list[list[int]], progress: StageProgress | None = None
                     ) -> tuple[list[ImageScore], list[list[Image.Image]]]:
    """Every prompt's images from its seeds, scored by the reward and the judge."""
    images = generate_images(model, prompts, seeds, held_out.sampler, progress=progress)
    return score_images(reward, judge, prompts, seeds, images, held_out.task), images


def read_scores(directory: str | Path, name: str) -> list[ImageScore]:
    """The per-image scores written by write_results."""
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation results at {str(path)!r}")
    return [ImageScore(**record) for record in json.loads(path.read_text())["images"]]


def evaluate_lora(held_out: HeldOut, lora: str | Path, out: str | Path, judge: QualityJudge, *,
                  num_prompts: int | None = 32, images_per_prompt: int = 4,
                  progress: StageProgress | None = None) -> dict:
    """Base against aligned on held-out prompts, same seeds, with the paired change between them; writes
    results and comparison.png. progress: advanced by each prompt sampled, base and aligned.

    A finished evaluation (its summary.json) is read back instead of being run again.
    """
    out = Path(out)
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    reward = build_reward(held_out.reward)
    prompts, seeds = evaluation_draw(held_out, num_prompts, images_per_prompt)
    model = load_flow_model(profile_for(held_out.model).weights)
    scores, images = {}, {}
    scores["base"], images["base"] = sample_and_score(model, held_out, reward, judge, prompts, seeds, progress)
    model.load_lora(lora)  # the same model, so a real checkpoint is held once
    scores["aligned"], images["aligned"] = sample_and_score(model, held_out, reward, judge, prompts, seeds, progress)
    summary = {}
    for name in ("base", "aligned"):
        summary[name] = summarise(scores[name])
        write_results(out, name, scores[name], summary[name])
    summary["change"] = paired_change(scores["base"], scores["aligned"])
    # The corrected score is the judge's: which judge, and how many of its answers held no rating.
    summary["judge"] = {"name": judge.describe(), "unparsed": judge.unparsed}
    summary["held_out"] = held_out.record(len(prompts))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    shown = {name: [row[:GRID_IMAGES_PER_PROMPT] for row in rows[:GRID_PROMPTS]] for name, rows in images.items()}
    comparison_grid(shown["base"], shown["aligned"], [p.prompt for p in prompts[:GRID_PROMPTS]]).save(
        out / "comparison.png")
    return summary


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
