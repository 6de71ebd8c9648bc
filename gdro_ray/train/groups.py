"""From stored group rows to training batches: draw k members per group, pad and mask small groups.

Documented behaviour for awkward data:
- a group with fewer than k images is used whole: its missing members are padded and masked, so it
  contributes the loss of a smaller group;
- a group whose rewards are all equal carries no ranking; such groups are left out when the dataset
  is read (``ranked_prompt_ids``), and a dataset with none left is refused;
- k larger than every group of the dataset is refused: lower k or generate more images per prompt;
- an image whose reward could not be computed (None) is no member: a group counts its scored images only.

A dataset scored with a mixed reward can be ranked again (``Ranking``): with other weights for its parts, or
with each part normalised over its group, from the parts kept in every image's details.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from gdro_ray.config import TrainConfig
from gdro_ray.data.manifest import file_identity, read_dataset_manifest
from gdro_ray.data.records import tensor_from_bytes
from gdro_ray.data.reference_cache import CACHE_COLUMNS, cached_draw
from gdro_ray.data.shards import read_shards
from gdro_ray.models.base import LORA_WEIGHTS, PromptEmbeddings, SamplerSettings
from gdro_ray.rewards.mixture import MIX, mix_values
from gdro_ray.train.step import GroupBatch

TRAINING_COLUMNS = [
    "prompt_id", "rewards", "latents", "latents_shape", "latents_dtype", "prompt_embeds",
    "prompt_embeds_shape", "pooled_embeds", "pooled_embeds_shape", "embeds_dtype", "sampler",
]  # fmt: skip


@dataclass(frozen=True)
class Ranking:
    """The rewards each group is ranked by: the stored ones, or (weights given) a mixed reward's parts mixed
    again with these weights, each part first normalised over its group if normalise."""

    weights: dict[str, float] | None = None
    normalise: bool = False

    def __post_init__(self):
        if self.normalise and self.weights is None:
            raise ValueError("normalising a mixed reward's parts needs its weights (resolve_ranking gives them)")

    @classmethod
    def of(cls, config: TrainConfig) -> "Ranking":
        return cls(config.reward_weights, config.reward_normalise)

    @property
    def columns(self) -> list[str]:
        return ["rewards"] + (["reward_details"] if self.weights is not None else [])

    def rewards(self, row: dict) -> list[float | None]:
        """One per member of the row; None for a member whose reward could not be computed."""
        if self.weights is None:
            return row["rewards"]
        scored = [index for index, reward in enumerate(row["rewards"]) if reward is not None]
        parts = [json.loads(row["reward_details"][index])["parts"] for index in scored]
        mixed = dict(zip(scored, mix_values(parts, self.weights, self.normalise))) if scored else {}
        return [mixed.get(index) for index in range(len(row["rewards"]))]


def resolve_ranking(config: TrainConfig) -> TrainConfig:
    """The config with the weights its ranking uses: --reward-weights, or with --reward-normalise alone the
    dataset's own mix. Both need a dataset scored with a mixed reward."""
    if config.reward_weights is None and not config.reward_normalise:
        return config
    spec = read_dataset_manifest(config.data)["identity"]["reward"]
    if spec.get("name") != MIX:
        raise ValueError(f"--reward-weights and --reward-normalise rank a mixed reward's parts again, but the dataset "
                         f"in {config.data!r} was scored with {spec.get('name')!r} alone")
    weights = config.reward_weights or {label: part["weight"] for label, part in spec["parts"].items()}
    unknown = sorted(set(weights) - set(spec["parts"]))
    if unknown:
        raise ValueError(f"--reward-weights names parts {unknown}; the dataset in {config.data!r} has parts "
                         f"{sorted(spec['parts'])}")
    return dataclasses.replace(config, reward_weights=weights)


def ranked_prompt_ids(directory: str, k: int, ranking: Ranking = Ranking()) -> tuple[list[str], dict]:
    """The groups worth training on, and counts of what was left out and why."""
    table = read_shards(directory, columns=["prompt_id", *ranking.columns])
    groups = [[r for r in ranking.rewards(row) if r is not None] for row in table.to_pylist()]
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


def training_columns(config: TrainConfig) -> list[str]:
    """The columns training reads: the cache's too when it trains on the cached reference, the reward details
    when it ranks a mixed reward's parts again."""
    return TRAINING_COLUMNS + (CACHE_COLUMNS if config.reference == "cached" else []) + \
        [column for column in Ranking.of(config).columns if column not in TRAINING_COLUMNS]


def check_reference_cache(config: TrainConfig) -> None:
    """A run on the cached reference needs a cache made by its own model with its sampler of t: any other would
    train against another reference, silently."""
    if config.reference != "cached":
        return
    identity = read_dataset_manifest(config.data)["identity"]
    cache = identity.get("reference_cache")
    if cache is None:
        raise ValueError(f"--reference cached, but the group dataset in {config.data!r} has no reference cache: "
                         "make it with --reference-draws M, or train with --reference live")
    made_by = (identity["model"], identity["revision"])
    if made_by != (config.model, config.revision):
        raise ValueError(f"the reference cache in {config.data!r} was made by model {made_by[0]!r} (revision "
                         f"{made_by[1]!r}), not this run's {config.model!r} (revision {config.revision!r}): "
                         "train with --reference live or make the dataset with this model")
    if cache["timesteps"] != config.timesteps:
        raise ValueError(f"the reference cache in {config.data!r} drew t with {cache['timesteps']!r}, this run with "
                         f"--timesteps {config.timesteps!r}: use the same, or --reference live")
    expected = file_identity(str(Path(config.reference_lora) / LORA_WEIGHTS)) if config.reference_lora else None
    if cache.get("lora") != expected:
        held, wanted = (f"the LoRA {lora}" if lora else "the base model" for lora in (cache.get("lora"), expected))
        raise ValueError(f"the reference cache in {config.data!r} holds {held}'s velocities, this run's reference is "
                         f"{wanted} (--reference-lora)")


def read_ranked_groups(batch: dict, prompt_ids: list[str], columns: list[str]):
    """Ray Data reader: the given columns of the given groups in the batch's shard files, a row group at a
    time (a shard never has to fit in memory whole)."""
    wanted = pa.array(prompt_ids, type=pa.string())
    for path in np.asarray(batch["path"]).tolist():
        shard = pq.ParquetFile(path)
        for index in range(shard.num_row_groups):
            table = shard.read_row_group(index, columns=columns)
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


def group_batch(rows: list[dict], k: int, generator: torch.Generator, cached: bool = False,
                ranking: Ranking = Ranking()) -> GroupBatch:
    """Draw k scored members of each group (all of a smaller group, masked to k) into one GroupBatch, ranked by
    ranking's rewards; cached: with one of each group's cached reference draws."""
    latents, rewards, masks, draws, references = [], [], [], [], []
    for row in rows:
        row_rewards = ranking.rewards(row)
        scored = [index for index, reward in enumerate(row_rewards) if reward is not None]
        members = tensor_from_bytes(row["latents"], row["latents_shape"], row["latents_dtype"])[scored]
        group_rewards = torch.tensor([row_rewards[index] for index in scored], dtype=torch.float32)
        pick = torch.randperm(len(scored), generator=generator)[:k]
        padding = k - len(pick)
        if cached:
            t, eps, reference = cached_draw(row, torch.tensor(scored)[pick], generator)
            draws.append((t, eps))
            references.append(torch.cat([reference, reference.new_zeros(padding, *reference.shape[1:])]))
        latents.append(torch.cat([members[pick], members.new_zeros(padding, *members.shape[1:])]))
        rewards.append(torch.cat([group_rewards[pick], group_rewards.new_zeros(padding)]))
        masks.append(torch.arange(k) < len(pick))
    sequence = torch.stack([tensor_from_bytes(r["prompt_embeds"], r["prompt_embeds_shape"], r["embeds_dtype"]) for r in rows])
    pooled = torch.stack([tensor_from_bytes(r["pooled_embeds"], r["pooled_embeds_shape"], r["embeds_dtype"]) for r in rows])
    mask = torch.stack(masks)
    batch = GroupBatch(torch.stack(latents), torch.stack(rewards), PromptEmbeddings(sequence, pooled),
                       SamplerSettings.from_dict(json.loads(rows[0]["sampler"])), None if mask.all() else mask)
    if cached:
        batch.draws = torch.stack([t for t, _ in draws]), torch.stack([eps for _, eps in draws])
        batch.reference = torch.stack(references)
    return batch
