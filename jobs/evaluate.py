"""Evaluate base against aligned on held-out prompts: task reward, quality, corrected score, a picture.

    python jobs/evaluate.py --data runs/ocr-groups --lora runs/gdro/lora --out runs/gdro/eval
    python jobs/evaluate.py --task ocr --model /data/FLUX.1-dev --lora runs/ocr/lora --judge-url http://judge:8000/score

With --data (the group dataset the LoRA was trained on) the evaluation uses what the dataset was made with:
its model, its reward (a dataset made with --reward or from a --prompt-file is scored the same way), its
sampler, and the held-out split of its prompts. Without it, the task's defaults on --model. Both models see
the same prompts and seeds. Writes base.json/.csv, aligned.json/.csv, summary.json and comparison.png (each
row a prompt: its text, base images left, aligned right).
"""

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

from gdro_ray.cli import add_dataclass_arguments, from_arguments, option, values_given
from gdro_ray.console import add_verbose_argument, set_verbose
from gdro_ray.evaluate import HeldOut, evaluate_lora, format_table
from gdro_ray.models import SamplerSettings
from gdro_ray.profiles import DEFAULT_MODEL, TASKS, JudgeSettings, quality_judge


@dataclass
class EvaluateSettings(JudgeSettings):
    lora: str = option("", "the aligned LoRA directory (diffusers format); required")
    data: str | None = option(None, "the group dataset the LoRA was trained on")
    task: str = option("ocr", "without --data: the task", choices=TASKS)
    model: str = option(DEFAULT_MODEL, "without --data: 'tiny', a diffusers FLUX or SD3 directory, or a hub id")
    seed: int = option(0, "without --data: the dataset seed, which decides the held-out split")
    eval_prompt_file: str | None = option(None, "evaluate on this file's prompts, e.g. GenEval's 553 of "
                                                "evaluation_metadata.jsonl or Flow-GRPO's OCR test.txt")
    eval_prompts: int = option(32, "held-out prompts (0: all of --eval-prompt-file's)")
    images_per_prompt: int = option(4, "images per held-out prompt, one seed each")
    out: str = option("runs/eval", "where the results and comparison.png go")

    def __post_init__(self):
        if not self.lora or not Path(self.lora).is_dir():
            raise FileNotFoundError(f"--lora must be a LoRA directory, got {self.lora!r}")
        if self.images_per_prompt < 1 or self.eval_prompts < (0 if self.eval_prompt_file else 1):
            raise ValueError(f"images_per_prompt must be >= 1 and eval_prompts >= 1 (0 with an evaluation file: "
                             f"all of it), got {self.images_per_prompt} and {self.eval_prompts}")

    def held_out(self) -> HeldOut:
        if self.data:
            return HeldOut.of_dataset(self.data, self.eval_prompt_file)
        return HeldOut.of_task(self.task, self.model, self.seed, eval_prompt_file=self.eval_prompt_file)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, EvaluateSettings)
    add_dataclass_arguments(parser.add_argument_group("sampler (default: the dataset's, or the model's)"),
                            SamplerSettings)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    try:
        settings = from_arguments(args, EvaluateSettings)
        held_out = settings.held_out()
        held_out = replace(held_out, sampler=held_out.sampler.with_overrides(**values_given(args, SamplerSettings)))
        judge = quality_judge(held_out.model, **settings.judge())
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    summary = evaluate_lora(held_out, settings.lora, settings.out, judge, num_prompts=settings.eval_prompts or None,
                            images_per_prompt=settings.images_per_prompt)
    print(format_table(summary))
    return summary


if __name__ == "__main__":
    main()
