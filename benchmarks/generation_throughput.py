"""Images per second of the Ray Data group pipeline against a plain single-process loop.

Both run the same model, prompts, sampler and reward, and write the same shards; the plain loop
calls the pipeline's own generation and scoring stages in sequence, in this process, so the ratio
measures what Ray Data's actor pools add (overlap of generation with scoring and writing, one model
replica per actor) net of their start-up cost. The breakdown: when the first shard was written (the
plain loop's model and OCR loading; Ray's actor processes, their imports and loading), the pace between
the first shard and the last (steady state), and each stage's seconds summed over groups (a stage that
runs slower in its actor than in the plain loop shares its core with another).

    python benchmarks/generation_throughput.py                  # the align job's 96 prompts x k=8
    python benchmarks/generation_throughput.py --num-prompts 16 # start-up weighs more
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from gdro_ray.data.shards import shard_paths
from gdro_ray.generation import GenerationConfig, GroupGenerator, generate_groups, pending_prompts
from gdro_ray.group_scoring import GroupScorer
from gdro_ray.profiles import profile_for
from gdro_ray.ray_session import init_ray


def shard_times(config: GenerationConfig, started: float) -> dict:
    """Seconds from the start to the first and to the last shard written, from the files' times."""
    times = sorted(path.stat().st_mtime for path in shard_paths(config.out))
    offset = time.time() - time.perf_counter()  # file times are wall-clock times
    return {"first_shard": times[0] - offset - started, "last_shard": times[-1] - offset - started,
            "shards": len(times)}


def plain_loop(config: GenerationConfig) -> dict:
    started = time.perf_counter()
    generator = GroupGenerator(config)
    scorer = GroupScorer(config.reward, config.out)
    seconds = {"generation": 0.0, "scoring": 0.0, "writing": 0.0}
    prompts = pending_prompts(config)
    for first in range(0, len(prompts), config.prompts_per_batch):
        chunk = prompts[first : first + config.prompts_per_batch]
        batch = {"prompt_id": [p.prompt_id for p in chunk], "prompt": [p.prompt for p in chunk],
                 "metadata": [json.dumps(p.metadata) for p in chunk]}
        summary = scorer(generator(batch))
        for stage in seconds:
            seconds[stage] += sum(summary.column(f"{stage}_seconds").to_pylist())
    return {"wall_seconds": time.perf_counter() - started, "stage_seconds": seconds, **shard_times(config, started)}


def ray_pipeline(config: GenerationConfig) -> dict:
    started = time.perf_counter()
    manifest = generate_groups(config, progress=False)
    per_group = manifest["counts"]["seconds_per_group"]
    groups = manifest["counts"]["generated_this_run"]
    return {"wall_seconds": time.perf_counter() - started, "stage_seconds": {k: v * groups for k, v in per_group.items()},
            **shard_times(config, started)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="ocr")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--num-prompts", type=int, default=96, help="96: the align job's dataset")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=None)
    parser.add_argument("--prompts-per-batch", type=int, default=2)
    parser.add_argument("--actors", type=int, default=1,
                        help="generation and scoring actors each, a CPU apiece (1 and 1 fill 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each Ray actor gets one CPU, so both sides use the cores alike

    with tempfile.TemporaryDirectory() as scratch:
        sampler = profile_for(args.model).sampler.with_overrides(num_steps=args.num_steps)
        settings = dict(task=args.task, model=args.model, num_prompts=args.num_prompts, k=args.k, sampler=sampler,
                        prompts_per_batch=args.prompts_per_batch)
        plain = plain_loop(GenerationConfig(**settings, out=str(Path(scratch) / "plain")))
        init_ray()
        pooled = ray_pipeline(GenerationConfig(**settings, out=str(Path(scratch) / "ray"),
                                               generation_actors=(args.actors, args.actors),
                                               scoring_actors=(args.actors, args.actors)))
    images = args.num_prompts * args.k
    print(f"{images} images ({args.num_prompts} prompts x k={args.k}), model {args.model}, task {args.task}")
    print(f"{'':22}{'images/s':>10}{'wall s':>8}{'1st shard s':>13}{'steady images/s':>17}"
          f"{'gen s':>8}{'score s':>9}{'write s':>9}")
    for name, result in (("plain loop (1 proc)", plain), (f"Ray Data ({args.actors}+{args.actors} actors)", pooled)):
        stages = result["stage_seconds"]
        result["steady"] = images * (result["shards"] - 1) / result["shards"] / \
            (result["last_shard"] - result["first_shard"])  # shards hold the same number of prompts
        print(f"{name:22}{images / result['wall_seconds']:>10.2f}{result['wall_seconds']:>8.1f}"
              f"{result['first_shard']:>13.1f}{result['steady']:>17.2f}"
              f"{stages['generation']:>8.1f}{stages['scoring']:>9.1f}{stages['writing']:>9.1f}")
    print(f"ratio Ray Data / plain loop: {plain['wall_seconds'] / pooled['wall_seconds']:.2f}x images per second "
          f"({pooled['steady'] / plain['steady']:.2f}x after the first shard)")


if __name__ == "__main__":
    main()
