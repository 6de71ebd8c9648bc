import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import sampler
from gdro_ray.data.manifest import ManifestMismatch, read_manifest
from gdro_ray.data.records import png_to_image, tensor_from_bytes
from gdro_ray.data.shards import read_shards, shard_paths
from gdro_ray.generation import GenerationConfig, derive_seed, generate_groups
from gdro_ray.models import load_flow_model
from gdro_ray.profiles import profile_for
from gdro_ray.ray_session import init_ray

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    init_ray()
    yield
    ray.shutdown()


def small_config(out, **overrides):
    settings = dict(task="ocr", num_prompts=3, k=4, sampler=sampler(2), prompts_per_batch=2, out=str(out))
    return GenerationConfig(**{**settings, **overrides})


def test_small_run_writes_groups_that_load_back_as_tensors(ray_cluster, tmp_path):
    config = small_config(tmp_path / "groups")
    manifest = generate_groups(config, progress=False)
    assert manifest["complete"] and manifest["counts"]["groups"] == 3
    assert manifest["identity"]["reward"] == {"name": "ocr", "engine": "rapidocr", "min_side": 256,
                                              "detection": "image"}
    assert set(manifest["counts"]["seconds_per_group"]) == {"generation", "scoring", "writing"}

    rows = read_shards(config.out).to_pylist()
    all_rewards = [reward for row in rows for reward in row["rewards"]]
    assert manifest["counts"]["mean_reward"] == pytest.approx(sum(all_rewards) / len(all_rewards))
    assert len({row["prompt_id"] for row in rows}) == 3
    model = load_flow_model(profile_for("tiny").weights)
    text_dim = model.transformer.config.joint_attention_dim
    for row in rows:
        latents = tensor_from_bytes(row["latents"], row["latents_shape"], row["latents_dtype"])
        assert latents.shape == (4, 64, 16) and latents.dtype == torch.float32
        assert tensor_from_bytes(row["prompt_embeds"], row["prompt_embeds_shape"], row["embeds_dtype"]).shape == (
            32, text_dim)
        pooled = tensor_from_bytes(row["pooled_embeds"], row["pooled_embeds_shape"], row["embeds_dtype"])
        assert pooled.shape == (model.transformer.config.pooled_projection_dim,)
        assert len(row["rewards"]) == 4 and all(0 <= reward <= 1 for reward in row["rewards"])
        details = [json.loads(text) for text in row["reward_details"]]
        assert all("recognised" in detail or "error" in detail for detail in details)
        assert row["seeds"] == [derive_seed(0, row["prompt_id"], i) for i in range(4)]
        assert png_to_image(row["images"][0]).size == (32, 32)
        assert json.loads(row["sampler"]) == {"height": 32, "width": 32, "num_steps": 2, "guidance_scale": 3.5,
                                                 "cfg_scale": 1.0}
        # The stored latents are what the model generates from those seeds, and the cached
        # embeddings are its prompt encoding: training can trust them without re-running anything.
        prompt = model.encode_prompts([row["prompt"]])
        again = model.generate(prompt, row["seeds"][:2], sampler(2))
        torch.testing.assert_close(again.latents, latents[:2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prompt.sequence[0], tensor_from_bytes(row["prompt_embeds"], row["prompt_embeds_shape"],
                                                                        row["embeds_dtype"]))


def test_rerun_resumes_and_a_changed_config_is_refused(ray_cluster, tmp_path):
    out = tmp_path / "groups"
    generate_groups(small_config(out, num_prompts=2), progress=False)
    first_shards = shard_paths(out)
    again = generate_groups(small_config(out, num_prompts=2), progress=False)
    assert again["counts"]["generated_this_run"] == 0 and shard_paths(out) == first_shards

    more = generate_groups(small_config(out, num_prompts=4), progress=False)
    assert more["counts"]["generated_this_run"] == 2 and more["counts"]["groups"] == 4
    assert len(read_shards(out)) == 4  # read_shards also checks that no prompt id repeats

    with pytest.raises(ManifestMismatch, match=r"k: 4 -> 3.*--overwrite"):
        generate_groups(small_config(out, k=3), progress=False)
    replaced = generate_groups(small_config(out, k=3, num_prompts=1), overwrite=True, progress=False)
    assert replaced["counts"]["groups"] == 1 and replaced["identity"]["k"] == 3


def test_a_killed_run_then_rerun_writes_each_prompt_exactly_once(tmp_path):
    out = tmp_path / "groups"
    command = [sys.executable, str(ROOT / "jobs" / "generate.py"), "--task", "ocr", "--num-prompts", "6", "--k", "3",
               "--num-steps", "2", "--prompts-per-batch", "1", "--out", str(out), "--no-progress"]
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(command, env=environment, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not shard_paths(out) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert shard_paths(out), "the first run wrote no shard before the deadline"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
        process.wait()
    assert read_manifest(out)["complete"] is False

    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    ids = read_shards(out, columns=["prompt_id"]).column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == 6
    manifest = read_manifest(out)
    # What the killed run finished stays (an actor may even finish a shard after its driver died).
    assert manifest["complete"] and manifest["counts"]["generated_this_run"] < 6


def test_a_killed_scoring_actor_is_replaced_and_no_prompt_is_lost_or_doubled(ray_cluster, tmp_path):
    import threading

    import psutil

    out = tmp_path / "groups"
    killed = []

    def kill_a_scorer_after_the_first_shard():
        deadline = time.monotonic() + 120
        while not shard_paths(out) and time.monotonic() < deadline:
            time.sleep(0.1)
        for process in psutil.process_iter(["cmdline"]):
            if "GroupScorer" in " ".join(process.info["cmdline"] or []):
                process.kill()
                killed.append(process.pid)
                return

    killer = threading.Thread(target=kill_a_scorer_after_the_first_shard, daemon=True)
    killer.start()
    manifest = generate_groups(small_config(out, num_prompts=6, prompts_per_batch=1), progress=False)
    killer.join()
    assert killed, "no scoring actor was found to kill"
    ids = read_shards(out, columns=["prompt_id"]).column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == 6 and manifest["counts"]["groups"] == 6


def test_a_corrupt_shard_is_named(tmp_path):
    (tmp_path / "group-deadbeef.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match="group-deadbeef.parquet.*corrupt"):
        read_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="no group shards"):
        read_shards(tmp_path / "empty")


@pytest.mark.parametrize(
    "overrides, message",
    [({"k": 1}, "k .* must be >= 2"), ({"num_prompts": 0}, "num_prompts"), ({"generation_actors": (2, 1)}, "min <= max")],
)
def test_bad_generation_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, **overrides)


def test_more_prompts_than_the_split_holds_are_refused_before_any_work(tmp_path):
    """The tiny glyph set's training split holds 1063 prompts: a dataset asked for more is not silently smaller."""
    assert len(small_config(tmp_path, num_prompts=1063).prompts()) == 1063
    with pytest.raises(ValueError, match="asks for 1064 prompts, but the train split of the 'ocr' prompt set has 1063"):
        small_config(tmp_path, num_prompts=1064).prompts()
    with pytest.raises(ValueError, match="has 63 after its first 1000"):
        small_config(tmp_path, num_prompts=64, first_prompt=1000).prompts()


def test_each_task_has_a_full_reward_spec_and_unknown_ones_are_named():
    from gdro_ray.data.prompts import ocr_stream
    from gdro_ray.tiny_world.glyphs import glyphs_stream

    flux, tiny = profile_for("black-forest-labs/FLUX.1-dev"), profile_for("tiny")
    assert flux.weights == "black-forest-labs/FLUX.1-dev" and (flux.sampler.height, tiny.sampler.height) == (512, 32)
    assert flux.reward_spec("geneval")["detector"] == "PekingU/rtdetr_r50vd_coco_o365"
    assert tiny.reward_spec("geneval")["detector"] == "gdro_ray.tiny_world.detector:ShapesDetector"
    assert tiny.reward_spec("ocr") == flux.reward_spec("ocr")  # the same OCR reward
    assert (tiny.prompt_sets["ocr"], flux.prompt_sets["ocr"]) == (glyphs_stream, ocr_stream)
    assert flux.reward_spec("custom", "prompts.jsonl")["name"] == "geneval"
    easyocr = {"name": "ocr", "engine": "easyocr", "min_side": 256, "detection": "image"}
    assert flux.reward_spec("custom", "p.txt", {"engine": "easyocr"}) == easyocr
    with pytest.raises(ValueError, match="needs a prompt file"):
        flux.reward_spec("custom")
    with pytest.raises(ValueError, match="no reward for 'aesthetics'"):
        flux.reward_spec("ocr", overrides={"name": "aesthetics"})
    with pytest.raises(FileNotFoundError, match="neither a diffusers pipeline directory nor a hub id"):
        profile_for("./models/missing-flux")
