"""Pretrain the embedded tiny FLUX on shapes and glyphs renders (CPU, under an hour on 2 cores).

    python jobs/pretrain_tiny.py                         # resumes from runs/pretrain-tiny if stopped
    python jobs/pretrain_tiny.py --steps 200 --vae-steps 100 --out /tmp/tiny   # a quick trial

The result (a diffusers FluxPipeline directory with recipe.json) replaces the shipped model when
--out is left at its default, gdro_ray/tiny_world/pretrained.
"""

import argparse
from pathlib import Path

import torch

from gdro_ray.cli import add_dataclass_arguments, from_arguments
from gdro_ray.tiny_world import PRETRAINED_DIR
from gdro_ray.tiny_world.pretrain import PretrainConfig, pretrain


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, PretrainConfig)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/pretrain-tiny"), help="checkpoints, for resume")
    parser.add_argument("--out", type=Path, default=PRETRAINED_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        config = from_arguments(args, PretrainConfig)
    except ValueError as error:
        parser.error(str(error))
    recipe = pretrain(args.work_dir, args.out, config, device=args.device, log=lambda message: print(message, flush=True))
    print(f"saved {args.out} after {recipe['seconds']} s (final loss {recipe['final_loss']:.4f})")


if __name__ == "__main__":
    main()
