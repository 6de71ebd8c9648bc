"""Generate and score the offline group dataset: k images per prompt, their rewards, Parquet shards.

    python jobs/generate.py --task ocr --num-prompts 32 --k 16 --out runs/ocr-groups          # local Ray
    RAY_ADDRESS=auto python jobs/generate.py --task geneval --model black-forest-labs/FLUX.1-dev \\
        --generation-actors 1,8 --out s3://...                                                  # a cluster

Rerunning the same command resumes: prompts already written are skipped.
"""

import argparse
import json
import sys

from gdro_ray.data.generation import GenerationConfig, generate_groups, parse_pool
from gdro_ray.ray_session import init_ray
from gdro_ray.resource_plan import ResourcePlanError


def reward_spec(text: str) -> dict:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--reward must be JSON like '{{\"name\": \"geneval\", \"mode\": \"strict\"}}': {error}")
    if not isinstance(spec, dict) or "name" not in spec:
        raise argparse.ArgumentTypeError(f"--reward must be a JSON object with a 'name', got {text!r}")
    return spec


def parse_args(argv=None) -> tuple[GenerationConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = GenerationConfig()
    parser.add_argument("--task", default=defaults.task, help="ocr, geneval, or custom (with --prompt-file)")
    parser.add_argument("--model", default=defaults.model, help="'tiny', a diffusers FLUX directory, or a hub id")
    parser.add_argument("--revision", default=None, help="hub revision of --model")
    parser.add_argument("--prompt-file", default=None, help="a .txt (one OCR prompt a line) or GenEval .jsonl file")
    parser.add_argument("--split", default=defaults.split, choices=["train", "heldout"])
    parser.add_argument("--num-prompts", type=int, default=defaults.num_prompts)
    parser.add_argument("--k", type=int, default=defaults.k, help="images per prompt")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-steps", type=int, default=None, help="sampler steps per image")
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale, help="FLUX.1-dev's distilled guidance")
    parser.add_argument("--cfg-scale", type=float, default=defaults.cfg_scale, help="classifier-free guidance (1: off)")
    parser.add_argument("--reward", type=reward_spec, default=None, help="reward spec as JSON (default: the task's)")
    parser.add_argument("--out", default=defaults.out, help="dataset directory")
    parser.add_argument("--prompts-per-batch", type=int, default=defaults.prompts_per_batch)
    parser.add_argument("--generation-actors", type=parse_pool, default=defaults.generation_actors, help="MIN,MAX")
    parser.add_argument("--scoring-actors", type=parse_pool, default=defaults.scoring_actors, help="MIN,MAX")
    parser.add_argument("--gpus-per-generator", type=float, default=None, help="default: 1 if the cluster has or can get GPUs")
    parser.add_argument("--overwrite", action="store_true", help="delete a dataset made with other settings")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = GenerationConfig(
        task=args.task, model=args.model, revision=args.revision, prompt_file=args.prompt_file, split=args.split,
        seed=args.seed, k=args.k, height=args.height, width=args.width, num_steps=args.num_steps,
        guidance_scale=args.guidance_scale, cfg_scale=args.cfg_scale, reward=args.reward or {},
        num_prompts=args.num_prompts, out=args.out,
        prompts_per_batch=args.prompts_per_batch, generation_actors=args.generation_actors,
        scoring_actors=args.scoring_actors, gpus_per_generator=args.gpus_per_generator,
    )
    return config, args


def main(argv=None):
    config, args = parse_args(argv)
    init_ray()
    try:
        manifest = generate_groups(config, overwrite=args.overwrite, progress=not args.no_progress)
    except ResourcePlanError as error:
        sys.exit(f"generate: {error}")
    print(json.dumps({"out": config.out, **manifest["counts"]}, indent=2))


if __name__ == "__main__":
    main()
