"""The offline group dataset on Ray Data: prompts -> generation actors -> reward actors -> Parquet shards.

    prompts ──► GroupGenerator pool (one model replica per actor, a GPU each on clusters)
            ──► GroupScorer pool (gdro_ray.group_scoring: reward model per actor; writes each scored batch as
                one shard)
            ──► summary rows to the driver (progress, per-stage times)

Resume: prompts already in a shard are left out before the pipeline starts, so a rerun (after a
finished, a killed or a failed run) generates each missing prompt once and no prompt twice.
"""

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
from tqdm import tqdm

from gdro_ray.cli import option
from gdro_ray.console import quiet_libraries
from gdro_ray.data.manifest import MANIFEST_NAME, check_resumable, file_identity, write_manifest
from gdro_ray.data.prompts import PromptRecord
from gdro_ray.data.records import image_to_png, tensor_to_bytes
from gdro_ray.data.reference_cache import cache_identity, reference_draws
from gdro_ray.data.shards import read_shards, remove_partial_shards, shard_paths, written_prompt_ids
from gdro_ray.flow import TIMESTEP_SAMPLERS
from gdro_ray.group_scoring import GroupScorer
from gdro_ray.meter import ComputeMeter
from gdro_ray.models import LORA_WEIGHTS, SamplerSettings, load_flow_model
from gdro_ray.profiles import DEFAULT_MODEL, profile_for
from gdro_ray.resource_plan import StagePlan, cluster_ready_for, generation_plan, read_capacity


REFERENCE_POLICIES = ("base", "lora")


@dataclass
class GenerationConfig:
    """Settings of one group dataset. Fields up to ``first_prompt`` decide its content (the manifest's identity)."""

    task: str = option("ocr", "ocr, geneval, or custom (with --prompt-file)")
    model: str = option(DEFAULT_MODEL, "'tiny' (the embedded model), a diffusers FLUX or SD3 directory, or a hub id")
    revision: str | None = option(None, "hub revision of --model")
    prompt_file: str | None = option(None, "a .txt (one OCR prompt a line) or GenEval .jsonl file",
                                     aliases=("--train-prompt-file",))
    split: str = option("train", "which split of the prompts ('all': every prompt of a file)",
                        choices=("train", "heldout", "all"))
    seed: int = option(0, "dataset seed: decides the prompts, their split and every image's noise")
    k: int = option(16, "images generated per prompt (k_gen); training later draws k <= k_gen of them")
    sampler: SamplerSettings | None = option(None, "how to sample (default: the model's own)")
    reward: dict = option(help="reward spec as JSON over the task's, e.g. '{\"mode\": \"strict\"}'",
                          default_factory=dict)
    reference_draws: int = option(0, "reference cache: (t, eps) draws per group at which every member's reference "
                                     "velocity is stored, for training with --reference cached (0: no cache)")
    reference_timesteps: str = option("logit_normal", "the cache's sampler of t, as training's --timesteps",
                                      choices=TIMESTEP_SAMPLERS)
    lora: str | None = option(None, "a LoRA directory (diffusers' format) the images are generated with, e.g. an "
                                    "earlier round's policy")
    reference_policy: str = option("base", "whose velocities the reference cache holds: the base model's, or with "
                                           "--lora that policy's", choices=REFERENCE_POLICIES)
    first_prompt: int = option(0, "leave out the split's first prompts (a later round's new prompts)")
    num_prompts: int | None = option(64, "prompts of the dataset (with --prompt-file, 0: all of the file's)")
    out: str = option("runs/groups", "dataset directory")
    prompts_per_batch: int = option(4, "prompts per generation batch (one shard per scored batch)")
    generation_actors: tuple[int, int] = option((1, 1), "MIN,MAX generation actors: the pool grows with the cluster",
                                                 pair_from_one=True)
    scoring_actors: tuple[int, int] = option((1, 1), "MIN,MAX scoring actors", pair_from_one=True)
    gpus_per_generator: float | None = option(None, "default: 1 when the cluster has or can get GPUs, else 0")
    gpus_per_scorer: float = option(0.0, "GPUs per scoring actor")

    def __post_init__(self):
        if self.prompt_file is not None and not Path(self.prompt_file).is_file():
            raise FileNotFoundError(f"prompt file {self.prompt_file!r} does not exist")
        profile = profile_for(self.model)  # refuses a model that is neither a directory nor a hub id
        self.sampler = self.sampler or profile.sampler
        self.reward = profile.reward_spec(self.task, self.prompt_file, self.reward)
        if self.reference_draws < 0:
            raise ValueError(f"reference_draws must be >= 0 (0: no cache), got {self.reference_draws}")
        if self.reference_timesteps not in TIMESTEP_SAMPLERS:
            raise ValueError(f"reference_timesteps must be one of {TIMESTEP_SAMPLERS}, "
                             f"got {self.reference_timesteps!r}")
        if self.k < 2:
            raise ValueError(f"k (images per prompt) must be >= 2 to form a group, got {self.k}")
        if self.lora is not None and not (Path(self.lora) / LORA_WEIGHTS).is_file():
            raise FileNotFoundError(f"LoRA directory {self.lora!r} holds no {LORA_WEIGHTS}")
        if self.reference_policy not in REFERENCE_POLICIES:
            raise ValueError(f"reference_policy must be one of {REFERENCE_POLICIES}, got {self.reference_policy!r}")
        if self.reference_policy == "lora" and not (self.lora and self.reference_draws):
            raise ValueError("reference_policy 'lora' caches the velocities of --lora: give both --lora and "
                             "--reference-draws")
        if self.first_prompt < 0:
            raise ValueError(f"first_prompt must be >= 0, got {self.first_prompt}")
        if self.num_prompts == 0 and self.prompt_file is not None:
            self.num_prompts = None  # all of the file's
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 (0: all of a prompt file's), got {self.num_prompts}")
        for name in ("generation_actors", "scoring_actors"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {(low, high)}")

    def identity(self) -> dict:
        # Settings left at their defaults stay out, so a dataset keeps the identity (and hash) it had before they
        # existed.
        lora = file_identity(str(Path(self.lora) / LORA_WEIGHTS)) if self.lora else None
        extras = {"reference_cache": cache_identity(self.reference_draws, self.reference_timesteps,
                                                    lora if self.reference_policy == "lora" else None)
                  if self.reference_draws else None,
                  "lora": lora,
                  "first_prompt": self.first_prompt or None}
        return {
            "task": self.task,
            "model": self.model,
            "revision": self.revision,
            "prompt_file": file_identity(self.prompt_file),
            "split": self.split,
            "seed": self.seed,
            "k": self.k,
            "sampler": self.sampler.to_dict(),
            "reward": self.reward,
            **{name: value for name, value in extras.items() if value is not None},
        }

    def prompts(self) -> list[PromptRecord]:
        wanted = None if self.num_prompts is None else self.first_prompt + self.num_prompts
        prompts = profile_for(self.model).prompts(self.task, split=self.split, num_prompts=wanted, seed=self.seed,
                                                  prompt_file=self.prompt_file)[self.first_prompt:]
        if not prompts:
            raise ValueError(f"the {self.split} split of task {self.task!r} has no prompts after its first "
                             f"{self.first_prompt}")
        if self.num_prompts is not None and len(prompts) < self.num_prompts:
            # A dataset silently smaller than asked would skew every size derived from it (steps of an epoch).
            source = f"prompt file {self.prompt_file!r}" if self.prompt_file else f"the {self.task!r} prompt set"
            raise ValueError(f"num_prompts asks for {self.num_prompts} prompts, but the {self.split} split of {source} "
                             f"has {len(prompts)} after its first {self.first_prompt}: ask for at most that many"
                             + (" (0: all of the file's)" if self.prompt_file else ", or give a --prompt-file"))
        return prompts


def derive_seed(dataset_seed: int, prompt_id: str, index: int) -> int:
    """The seed of image ``index`` of a prompt: stable across runs, machines and batchings."""
    digest = hashlib.sha256(f"{dataset_seed}/{prompt_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class GroupGenerator:
    """Ray Data actor: one model replica; turns a batch of prompts into groups of k images."""

    def __init__(self, config: GenerationConfig):
        quiet_libraries()
        self.config = config
        self.model = load_flow_model(profile_for(config.model).weights, revision=config.revision)
        if config.lora:  # once per actor: every batch generates with it
            self.model.load_lora(config.lora)
        self.meter = ComputeMeter()
        self.meter.watch(self.model.transformer)
        self.timesteps = self.model.training_timesteps(config.reference_timesteps, config.sampler)

    def __call__(self, batch: dict) -> pa.Table:
        config, started = self.config, time.perf_counter()
        prompts = self.model.encode_prompts([str(p) for p in batch["prompt"]])
        rows = []
        for index, prompt_id in enumerate(batch["prompt_id"]):
            seeds = [derive_seed(config.seed, str(prompt_id), i) for i in range(config.k)]
            forwards = self.meter.forward_passes
            group = self.model.generate(prompts.select([index]), seeds, config.sampler)
            cache = self._reference_cache(group.latents, prompts.select([index]), str(prompt_id))
            latents, latents_shape, latents_dtype = tensor_to_bytes(group.latents)
            sequence, sequence_shape, embeds_dtype = tensor_to_bytes(prompts.sequence[index])
            pooled, pooled_shape, _ = tensor_to_bytes(prompts.pooled[index])
            rows.append(
                {
                    "prompt_id": str(prompt_id),
                    "prompt": str(batch["prompt"][index]),
                    "task": config.task,
                    "metadata": str(batch["metadata"][index]),
                    "seeds": seeds,
                    "images": [image_to_png(image) for image in group.images],
                    "latents": latents,
                    "latents_shape": latents_shape,
                    "latents_dtype": latents_dtype,
                    "prompt_embeds": sequence,
                    "prompt_embeds_shape": sequence_shape,
                    "pooled_embeds": pooled,
                    "pooled_embeds_shape": pooled_shape,
                    "embeds_dtype": embeds_dtype,
                    "sampler": json.dumps(config.sampler.to_dict()),
                    "forward_passes": self.meter.forward_passes - forwards,
                    **cache,
                }
            )
        table = pa.Table.from_pylist(rows)
        seconds = time.perf_counter() - started
        return table.append_column("generation_seconds", pa.array([seconds / len(rows)] * len(rows)))

    def _reference_cache(self, latents, prompt, prompt_id: str) -> dict:
        config = self.config
        if not config.reference_draws:
            return {}
        seeds = [derive_seed(config.seed, f"{prompt_id}/reference", i) for i in range(config.reference_draws + 1)]
        base = config.lora and config.reference_policy == "base"
        with self.model.reference() if base else contextlib.nullcontext():  # the LoRA off: the base model's
            return reference_draws(self.model, latents, prompt, config.sampler, self.timesteps, seeds[0], seeds[1:])


def pending_prompts(config: GenerationConfig, overwrite: bool = False) -> list[PromptRecord]:
    """The prompts of this dataset not yet written; checks (or clears, with overwrite) what is there."""
    out = Path(config.out)
    if overwrite and out.exists():
        for path in shard_paths(out):
            path.unlink()
        (out / MANIFEST_NAME).unlink(missing_ok=True)
    check_resumable(out, config.identity())
    out.mkdir(parents=True, exist_ok=True)
    remove_partial_shards(out)
    prompts = config.prompts()
    done = written_prompt_ids(out)
    return [prompt for prompt in prompts if prompt.prompt_id not in done]


def generate_groups(config: GenerationConfig, overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Build (or complete) the group dataset in ``config.out`` on the current Ray cluster.

    Returns the manifest, with counts and the mean per-stage seconds per group of this run.
    """
    todo = pending_prompts(config, overwrite)
    out = Path(config.out)
    counts = {"groups": len(written_prompt_ids(out)), "images_per_group": config.k}
    write_manifest(out, config.identity(), counts, complete=False, prompt_file=config.prompt_file)
    stage_seconds = {"generation": 0.0, "scoring": 0.0, "writing": 0.0}
    if todo:
        plan = generation_plan(config, read_capacity())
        summaries = _pipeline(config, plan, todo).iter_batches(batch_size=None, batch_format="pyarrow")
        with cluster_ready_for(plan, log), \
                tqdm(total=len(todo), desc=f"groups of {config.k}", unit="prompt", disable=not progress) as bar:
            for summary in summaries:
                for stage in stage_seconds:
                    stage_seconds[stage] += sum(summary.column(f"{stage}_seconds").to_pylist())
                bar.update(summary.num_rows)
    rewards = read_shards(out, columns=["rewards"]).column("rewards").to_pylist() if shard_paths(out) else []
    scored = [reward for group in rewards for reward in group if reward is not None]
    counts["groups"] = len(rewards)
    counts["mean_reward"] = sum(scored) / max(len(scored), 1)
    counts["unscored_images"] = sum(map(len, rewards)) - len(scored)  # their reward failed: in no ranking
    counts["generated_this_run"] = len(todo)
    counts["seconds_per_group"] = {k: v / max(len(todo), 1) for k, v in stage_seconds.items()}
    counts["compute"] = dataset_compute(out) if shard_paths(out) else None
    return write_manifest(out, config.identity(), counts, complete=True, prompt_file=config.prompt_file)


def dataset_compute(directory: str | Path) -> dict | None:
    """What making and scoring every group of a dataset cost, summed over its rows (gdro_ray.meter); None for
    a dataset with rows made before the meter."""
    rows = read_shards(directory, columns=["compute"]).column("compute").to_pylist()
    if not rows or None in rows:
        return None
    total = ComputeMeter()
    for row in rows:
        total = total.add(json.loads(row))
    return total.as_dict()


def _pipeline(config: GenerationConfig, plan: StagePlan, prompts: list[PromptRecord]) -> ray.data.Dataset:
    items = [{"prompt_id": p.prompt_id, "prompt": p.prompt, "metadata": json.dumps(p.metadata)} for p in prompts]
    generators, scorers = plan.demands
    return (
        ray.data.from_items(items)
        .map_batches(
            GroupGenerator,
            fn_constructor_kwargs={"config": config},
            compute=ray.data.ActorPoolStrategy(min_size=config.generation_actors[0], max_size=config.generation_actors[1]),
            batch_size=config.prompts_per_batch,
            num_gpus=generators.each["GPU"],
            num_cpus=generators.each["CPU"],
        )
        .map_batches(
            GroupScorer,
            fn_constructor_kwargs={"reward_spec": config.reward, "shard_directory": str(Path(config.out).resolve())},
            compute=ray.data.ActorPoolStrategy(min_size=config.scoring_actors[0], max_size=config.scoring_actors[1]),
            batch_size=config.prompts_per_batch,
            batch_format="pyarrow",
            num_gpus=scorers.each["GPU"],
            num_cpus=scorers.each["CPU"],
        )
    )
