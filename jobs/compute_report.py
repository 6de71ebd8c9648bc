"""Held-out scores against compute, offline GDRO beside the online baseline, from finished run directories:

    python jobs/align.py --task ocr --out runs/ocr-gdro-0 --seed 0            # and --seed 1, ...
    python jobs/online.py --task ocr --out runs/ocr-grpo-0 --seed 0           # and --seed 1, ...
    python jobs/compute_report.py --method gdro runs/ocr-gdro-0 runs/ocr-gdro-1 \\
        --method flow-grpo runs/ocr-grpo-0 runs/ocr-grpo-1 --out runs/ocr-compute

A run of the compare job (runs/compare-TASK/runs/NAME) is a run directory too.

Writes OUT/compute.png (held-out reward, judge rating and corrected score against transformer forward passes and
wall seconds, the mean over each method's runs) and OUT/compute.md (final scores with standard errors, total
compute, and the share of each other method's compute the first method needed to reach its last held-out reward).
"""

import argparse

from gdro_ray.compute_report import compute_report


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", action="append", required=True, metavar=("NAME", "RUN"),
                        help="a method's name and its run directories (align, compare or online jobs); the first is measured "
                             "against the others")
    parser.add_argument("--out", required=True, help="where compute.png and compute.md go")
    parser.add_argument("--title", default="", help="the picture's title")
    args = parser.parse_args(argv)
    methods = {}
    for name, *runs in args.method:
        if not runs:
            parser.error(f"--method {name} names no run directory")
        methods[name] = runs
    try:
        markdown = compute_report(methods, args.out, args.title)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
