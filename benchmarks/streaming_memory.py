"""Does a large group dataset stream through training in bounded memory? One epoch over it, twice, side by side:
streamed (--replay-limit-mb 0: nothing kept) and with the in-memory replay (the default limit, which this
dataset fits), printing the workers' largest resident and private memory at the first report, their peak and at
the end (training's worker_rss_mb and worker_private_mb metrics, from the run's TensorBoard log).

    python benchmarks/streaming_memory.py                       # 5,000 groups of the tiny model, k = 2
    python benchmarks/streaming_memory.py --groups 20000 --out runs/streaming-20k

The dataset (tiny model, 1 sampler step, the brightness reward: the images' content does not matter here) is
made once in OUT/groups and reused; each training run resumes or is read back if it finished. Its prompts are
OUT/prompts.txt, one distinct sign a line (the tiny glyph set's training split holds only 1063).
"""

import argparse
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
WORKERS, GROUPS_PER_STEP = 2, 4


def run(arguments: list[str]) -> None:
    subprocess.run([sys.executable, *arguments], cwd=ROOT, check=True)


def sign_text(index: int) -> str:
    """A distinct word of capitals for each index: its digits in base 26, four letters at least."""
    letters = ""
    while index or len(letters) < 4:
        index, digit = divmod(index, 26)
        letters = chr(ord("A") + digit) + letters
    return letters


def worker_memory(run_directory: Path, name: str) -> list[float]:
    events = EventAccumulator(str(run_directory / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars(f"train/{name}")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=5000)
    parser.add_argument("--out", default="runs/streaming")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    data, prompts = out / "groups", out / "prompts.txt"
    out.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(f'a sign that says "{sign_text(index)}"\n' for index in range(args.groups)))
    run(["jobs/generate.py", "--task", "ocr", "--prompt-file", str(prompts), "--split", "all", "--num-prompts", "0",
         "--k", "2", "--num-steps", "1", "--reward", '{"name": "brightness"}', "--prompts-per-batch", "64",
         "--out", str(data), "--no-progress"])
    steps = args.groups // (WORKERS * GROUPS_PER_STEP)  # one epoch
    rows = []
    for name, limit in (("streamed", "0"), ("replayed", "2048")):
        run(["jobs/train.py", "--data", str(data), "--task", "ocr", "--k", "2", "--steps", str(steps),
             "--num-workers", str(WORKERS), "--groups-per-step", str(GROUPS_PER_STEP), "--replay-limit-mb", limit,
             "--checkpoint-every", str(steps), "--log-every", str(max(steps // 50, 1)), "--storage-path", str(out),
             "--name", name])
        for metric in ("worker_rss_mb", "worker_private_mb"):
            memory = worker_memory(out / name, metric)
            rows.append((name, limit, metric, memory[0], max(memory), memory[-1]))
    print(f"\n{args.groups} groups, one epoch of {steps} steps on {WORKERS} workers; the largest worker's memory "
          "(MiB), resident and private (resident less shared pages):")
    print("| run | replay limit (MiB) | memory | first report | peak | end | end / first |\n|---|---|---|---|---|---|---|")
    for name, limit, metric, first, peak, end in rows:
        print(f"| {name} | {limit} | {metric} | {first:.0f} | {peak:.0f} | {end:.0f} | {end / first:.3f} |")


if __name__ == "__main__":
    main()
