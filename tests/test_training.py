import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from conftest import sampler
from gdro_ray.config import TrainConfig, build_config, read_yaml
from gdro_ray.data.manifest import read_manifest
from gdro_ray.data.shards import read_shards, write_shard
from gdro_ray.generation import GenerationConfig, generate_groups
from gdro_ray.models import FluxModel
from gdro_ray.plots import read_scalars
from gdro_ray.ray_session import init_ray
from gdro_ray.train.groups import Ranking
from gdro_ray.train.trainer import run_training

TRAIN_DEFAULTS = dict(task="ocr", k=4, steps=4, groups_per_step=2, lr=3e-3, lora_rank=4, lora_alpha=4.0,
                      beta=100.0, tau=0.002, warmup_steps=0, checkpoint_every=2, num_workers=2,
                      cpus_per_worker=0.75)  # two workers and their data reader on 2 CPUs


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def groups(ray_cluster, tmp_path_factory, tiny_flux_dir):
    """Groups of a random tiny FLUX scored by brightness (a mix of two brightness parts), with a reference cache, plus
    one group of 3 (smaller than k) and one tie. Training reads the model from the dataset's manifest
    (train_config)."""
    out = tmp_path_factory.mktemp("groups")
    config = GenerationConfig(task="ocr", model=str(tiny_flux_dir), reward=BRIGHTNESS_MIX, num_prompts=6,
                              k=6, sampler=sampler(4), reference_draws=2, out=str(out))
    generate_groups(config, progress=False)
    row = read_shards(out).to_pylist()[0]
    latents_bytes = len(row["latents"]) // 6
    small = {**row, "prompt_id": "small-group", "seeds": row["seeds"][:3], "images": row["images"][:3],
             "latents": row["latents"][: 3 * latents_bytes], "latents_shape": [3, *row["latents_shape"][1:]],
             "rewards": row["rewards"][:3], "reward_details": row["reward_details"][:3]}
    tied = {**row, "prompt_id": "tied-group", "rewards": [0.5] * 6}
    write_shard([small, tied], out)
    return out


# A mixed reward (its two parts both brightness), so that training can weigh the parts again.
BRIGHTNESS_MIX = {"name": "mix", "parts": {"light": {"name": "brightness", "weight": 1.0},
                                           "light_again": {"name": "brightness", "weight": 0.5}}}


def train_config(groups, tmp_path, **overrides) -> TrainConfig:
    if "model" not in overrides:  # the model that made the groups
        overrides["model"] = read_manifest(groups)["identity"]["model"]
    return TrainConfig(**{**TRAIN_DEFAULTS, "data": str(groups), "storage_path": str(tmp_path), **overrides})


def velocity_probe(model):
    generator = torch.Generator().manual_seed(0)
    prompts = model.encode_prompts(['a sign that says "GDRO"'])
    latents = torch.randn(1, 64, 16, generator=generator)
    with torch.no_grad():
        return model.velocity(latents, torch.tensor([0.6]), prompts, sampler())


def test_two_deepspeed_workers_train_export_a_diffusers_lora_and_a_rerun_resumes(groups, tmp_path, tiny_flux_dir):
    config = train_config(groups, tmp_path, name="zero2", zero_stage=2)
    result = run_training(config)
    assert result.error is None and result.metrics["step"] == 4 and result.metrics["attempt_start_step"] == 0
    for name in ("loss", "loss_group", "loss_top1", "top1_agreement", "kendall_tau", "implicit_margin",
                 "grad_norm", "lr", "samples_per_second"):
        assert torch.isfinite(torch.tensor(result.metrics[name])), name
    assert list((config.run_directory / "tensorboard").glob("events.out.tfevents.*"))

    lora = config.run_directory / "lora"
    assert build_config(read_yaml(lora / "config.yaml")) == config
    pipeline = FluxPipeline.from_pretrained(tiny_flux_dir)
    base = velocity_probe(FluxModel(pipeline, device="cpu"))
    pipeline.load_lora_weights(lora)
    assert not torch.allclose(velocity_probe(FluxModel(pipeline, device="cpu")), base)

    # Rerun longer under the same name: it goes on from the step-4 checkpoint (ZeRO-2's sharded state), and the
    # meter from the checkpoint's totals: six steps' forwards, each step the same batch shape.
    resumed = run_training(replace(config, steps=6))
    assert resumed.metrics["step"] == 6 and resumed.metrics["attempt_start_step"] == 4
    assert resumed.metrics["compute_forward_passes"] == result.metrics["compute_forward_passes"] * 6 // 4
    # On one worker (an elastic run that lost a node): ZeRO's per-worker optimiser state cannot be split again,
    # so the LoRA, schedule and step go on and the moments start afresh instead of the restart failing.
    shrunk = run_training(replace(config, steps=8, num_workers=1))
    assert shrunk.metrics["step"] == 8 and shrunk.metrics["attempt_start_step"] == 6


def test_later_epochs_replay_the_first_in_the_same_order(groups, tmp_path):
    import itertools

    import ray.data

    from gdro_ray.train.worker import _batches

    table = read_shards(groups)
    shard = ray.data.from_arrow(table)
    config = train_config(groups, tmp_path, k=3)
    three_epochs = 3 * (len(table) // config.groups_per_step)  # micro-batches
    half_the_shard = table.nbytes / 2 / 2**20  # the replay lets go of what it kept once past its limit
    replayed, let_go, streamed = (  # from memory, streamed after passing the limit, streamed from the start
        list(itertools.islice(_batches(shard, replace(config, replay_limit_mb=limit), torch.Generator().manual_seed(0)),
                              three_epochs))
        for limit in (1024, half_the_shard, 0)
    )
    for kept, dropped, read in zip(replayed, let_go, streamed, strict=True):
        for batch in (kept, dropped):
            torch.testing.assert_close(batch.rewards, read.rewards)
            torch.testing.assert_close(batch.latents, read.latents)
    assert not torch.equal(replayed[0].rewards, replayed[1].rewards)  # the epochs hold more than one batch


def test_loss_falls_when_overfitting_a_small_dataset(groups, tmp_path):
    # Two whole groups of 6, every step: only the noise level t and the noise change between steps.
    fixed = tmp_path / "fixed"
    rows = [row for row in read_shards(groups).to_pylist() if len(row["rewards"]) == 6 and len(set(row["rewards"])) > 1]
    write_shard(rows[:2], fixed)
    config = train_config(fixed, tmp_path, model=read_manifest(groups)["identity"]["model"], name="overfit",
                          num_workers=1, strategy="deepspeed", steps=24, k=6,
                          lr=1e-2, checkpoint_every=24, ema_decay=0.0)
    run_training(config)
    scalars = read_scalars(config.run_directory / "tensorboard")  # read back from TensorBoard
    steps, losses = scalars["train/loss_group"]
    assert steps == list(range(1, 25))
    (_, resident), (_, private) = scalars["train/worker_rss_mb"], scalars["train/worker_private_mb"]
    assert all(0 < held < size for held, size in zip(private, resident))  # resident counts the shared pages too
    # A fresh LoRA scores every member 0, so L_GDRO starts at log 6! (hand-worked in test_train_step);
    # learning the two rankings takes it well below.
    assert losses[0] == pytest.approx(math.log(720), abs=1e-4)
    assert sum(losses[-6:]) / 6 < math.log(720) - 0.3, losses


def test_a_run_on_the_cached_reference_and_on_mixed_reward_parts_weighed_again(groups, tmp_path):
    # Weighed -1, the brightness part ranks every group the other way round: darker is better.
    config = train_config(groups, tmp_path, name="cached-reweighed", reference="cached",
                          reward_weights={"light": -1.0}, reward_normalise=True, steps=2, strategy="ddp",
                          num_workers=1)
    result = run_training(config)
    assert result.error is None and result.metrics["step"] == 2 and math.isfinite(result.metrics["loss"])
    # Per member and step: the policy's forward and its backward (2 forwards); live would add the reference's.
    assert result.metrics["compute_forward_passes"] == 2 * config.groups_per_step * config.k * 3
    assert read_yaml(config.run_directory / "lora" / "config.yaml")["reward_weights"] == {"light": -1.0}
    row = next(row for row in read_shards(groups).to_pylist() if len(set(row["rewards"])) == len(row["rewards"]))
    reversed_ranking = Ranking({"light": -1.0}, normalise=True).rewards(row)
    assert np.argsort(reversed_ranking).tolist() == np.argsort(row["rewards"])[::-1].tolist()


def test_non_finite_losses_stop_the_run_with_a_clear_error(groups, tmp_path):
    broken = tmp_path / "broken"
    rows = read_shards(groups).to_pylist()[:4]
    nan = torch.full((6, 64, 16), float("nan")).numpy().tobytes()
    write_shard([{**row, "latents": nan} for row in rows if len(row["rewards"]) == 6], broken)
    config = train_config(broken, tmp_path, model=read_manifest(groups)["identity"]["model"], name="nan",
                          num_workers=1, strategy="ddp", max_failures=0, max_nonfinite_steps=3, groups_per_step=1)
    with pytest.raises(Exception, match="non-finite losses in a row"):
        run_training(config)
