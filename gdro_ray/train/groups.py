"""From stored group rows to training batches: draw k members per group, pad and mask small groups.

Documented behaviour for awkward data:
- a group with fewer than k images is used whole: its missing members are padded and masked, so it
  contributes the loss of a smaller group;
- a group whose rewards are all equal carries no ranking; such groups are left out when the dataset
  is read (``ranked_prompt_ids``), and a dataset with none left is refused;
- k larger than every group of the dataset is refused: lower k or generate more images per prompt;
- an image whose reward could not be computed (None) is no member: a group counts its scored images only.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from gdro_ray.data.records import tensor_from_bytes
from gdro_ray.data.shards import read_shards
from gdro_ray.models.base import PromptEmbeddings, SamplerSettings
from gdro_ray.train.step import GroupBatch

TRAINING_COLUMNS = [
    "prompt_id", "rewards", "latents", "latents_shape", "latents_dtype", "prompt_embeds",
    "prompt_embeds_shape", "pooled_embeds", "pooled_embeds_shape", "embeds_dtype", "sampler",
]  # fmt: skip


def ranked_prompt_ids(directory: str, k: int) -> tuple[list[str], dict]:
    """The groups worth training on, and counts of what was left out and why."""
    table = read_shards(directory, columns=["prompt_id", "rewards"])
    groups = [[r for r in rewards if r is not None] for rewards in table.column("rewards").to_pylist()]
    sizes = [len(group) for group in groups]
    if k > max(sizes):
        raise ValueError(f"k={k} but the groups in {directory!r} hold at most {max(sizes)} scored images; "
                         "lower k or generate more images per prompt")
    spread = [len(group) >= 2 and max(group) > min(group) for group in groups]
    ids = [pid for pid, ranked in zip(table.column("prompt_id").to_pylist(), spread) if ranked]
    if not ids:
        raise ValueError(f"every group in {directory!r} has all-equal rewards: there is no ranking to learn")
    unscored = sum(pc.list_value_length(table.column("rewards")).to_pylist()) - sum(sizes)
    counts = {"groups": len(sizes), "ranked_groups": len(ids), "tied_groups_left_out": len(sizes) - len(ids),
              "groups_smaller_than_k": sum(size < k for size in sizes), "unscored_images_left_out": unscored}
    return ids, counts


def read_ranked_groups(batch: dict, prompt_ids: list[str]):
    """Ray Data reader: the training columns of the given groups in the batch's shard files, a row group at a
    time (a shard never has to fit in memory whole)."""
    wanted = pa.array(prompt_ids, type=pa.string())
    for path in np.asarray(batch["path"]).tolist():
        shard = pq.ParquetFile(path)
        for index in range(shard.num_row_groups):
            table = shard.read_row_group(index, columns=TRAINING_COLUMNS)
            table = table.filter(pc.is_in(table["prompt_id"], value_set=wanted))
            if table.num_rows:
                yield table


def check_enough_groups(ranked_groups: int, workers: int, groups_per_step: int) -> None:
    """Each worker needs at least one full micro-batch of its share, or its epochs would be empty."""
    needed = workers * groups_per_step
    if ranked_groups < needed:
        raise ValueError(f"the dataset has {ranked_groups} groups with a ranking, but {workers} workers x "
                         f"{groups_per_step} groups per step need at least {needed}; use fewer workers or "
                         "groups per step, or generate more prompts")


def group_batch(rows: list[dict], k: int, generator: torch.Generator) -> GroupBatch:
    """Draw k scored members of each group (all of a smaller group, masked to k) into one GroupBatch."""
    latents, rewards, masks = [], [], []
    for row in rows:
        scored = [index for index, reward in enumerate(row["rewards"]) if reward is not None]
        members = tensor_from_bytes(row["latents"], row["latents_shape"], row["latents_dtype"])[scored]
        group_rewards = torch.tensor([row["rewards"][index] for index in scored], dtype=torch.float32)
        pick = torch.randperm(len(scored), generator=generator)[:k]
        padding = k - len(pick)
        latents.append(torch.cat([members[pick], members.new_zeros(padding, *members.shape[1:])]))
        rewards.append(torch.cat([group_rewards[pick], group_rewards.new_zeros(padding)]))
        masks.append(torch.arange(k) < len(pick))
    sequence = torch.stack([tensor_from_bytes(r["prompt_embeds"], r["prompt_embeds_shape"], r["embeds_dtype"]) for r in rows])
    pooled = torch.stack([tensor_from_bytes(r["pooled_embeds"], r["pooled_embeds_shape"], r["embeds_dtype"]) for r in rows])
    mask = torch.stack(masks)
    return GroupBatch(torch.stack(latents), torch.stack(rewards), PromptEmbeddings(sequence, pooled),
                      SamplerSettings.from_dict(json.loads(rows[0]["sampler"])), None if mask.all() else mask)
