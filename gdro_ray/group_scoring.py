"""The scoring stage of the group pipeline (gdro_ray.generation): a Ray Data actor that scores each generated
group with the task's reward and writes each batch as one shard.

A module of its own so that a scoring actor imports the reward code only, not the image model's libraries:
on a small machine the two pools' start-up shares the cores.
"""

import json
import time

import pyarrow as pa

from gdro_ray.console import quiet_libraries
from gdro_ray.data.records import png_to_image
from gdro_ray.data.shards import write_shard
from gdro_ray.meter import ComputeMeter
from gdro_ray.rewards import build_reward
from gdro_ray.rewards.base import score_safely


class GroupScorer:
    """Ray Data actor: one reward model; scores each group and writes the batch as one shard."""

    def __init__(self, reward_spec: dict, shard_directory: str):
        quiet_libraries()
        self.reward = build_reward(reward_spec)
        self.reward.load()  # a reward model that cannot load fails the run here, not each image
        self.shard_directory = shard_directory

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        started = time.perf_counter()
        for row in rows:
            row_started = time.perf_counter()
            metadata = {**json.loads(row["metadata"]), "prompt": row["prompt"]}
            images = [png_to_image(png) for png in row["images"]]
            results = score_safely(self.reward, images, [metadata] * len(images))
            row["rewards"] = [None if result.reward is None else float(result.reward) for result in results]
            row["reward_details"] = [json.dumps(result.details) for result in results]
            seconds = {"generation": row["generation_seconds"], "scoring": time.perf_counter() - row_started}
            row["compute"] = json.dumps(ComputeMeter(row["forward_passes"], len(images), seconds).as_dict())
        scored = time.perf_counter()
        write_shard([{k: v for k, v in row.items() if k not in ("generation_seconds", "forward_passes")}
                     for row in rows], self.shard_directory)
        written = time.perf_counter()
        return pa.table(
            {
                "prompt_id": [row["prompt_id"] for row in rows],
                "generation_seconds": [row["generation_seconds"] for row in rows],
                "scoring_seconds": [(scored - started) / len(rows)] * len(rows),
                "writing_seconds": [(written - scored) / len(rows)] * len(rows),
            }
        )
