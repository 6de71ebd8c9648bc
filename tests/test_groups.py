import json

import pytest
import torch

from gdro_ray.config import REFERENCES, TrainConfig
from gdro_ray.data.manifest import file_identity, write_manifest
from gdro_ray.data.records import tensor_to_bytes
from gdro_ray.data.reference_cache import CACHE_COLUMNS, cache_identity, draw_noise
from gdro_ray.data.shards import shard_paths, write_shard
from gdro_ray.models import SamplerSettings
from gdro_ray.train.groups import (
    TRAINING_COLUMNS, Ranking, check_enough_groups, check_reference_cache, group_batch, ranked_prompt_ids,
    read_ranked_groups, resolve_ranking, training_columns,
)


def row(prompt_id, rewards, tokens=4, channels=2):
    latents, shape, dtype = tensor_to_bytes(torch.arange(len(rewards) * tokens * channels, dtype=torch.float32)
                                            .view(len(rewards), tokens, channels))
    embeds, embeds_shape, embeds_dtype = tensor_to_bytes(torch.zeros(3, 5))
    pooled, pooled_shape, _ = tensor_to_bytes(torch.zeros(5))
    return dict(prompt_id=prompt_id, prompt="p", task="ocr", metadata="{}", seeds=list(range(len(rewards))),
                images=[b""] * len(rewards), latents=latents, latents_shape=shape, latents_dtype=dtype,
                prompt_embeds=embeds, prompt_embeds_shape=embeds_shape, pooled_embeds=pooled,
                pooled_embeds_shape=pooled_shape, embeds_dtype=embeds_dtype, rewards=rewards,
                reward_details=["{}"] * len(rewards), sampler=json.dumps({"height": 32, "width": 32, "num_steps": 4, "guidance_scale": 2.0}))


def test_tied_groups_are_left_out_and_counted(tmp_path):
    write_shard([row("a", [0.1, 0.9, 0.5, 0.2]), row("tie", [0.5] * 4), row("small", [0.3, 0.7])], tmp_path)
    ids, counts = ranked_prompt_ids(str(tmp_path), k=3)
    assert sorted(ids) == ["a", "small"]
    assert counts == {"groups": 3, "ranked_groups": 2, "tied_groups_left_out": 1, "groups_smaller_than_k": 1,
                      "unscored_images_left_out": 0}


def test_an_image_without_a_reward_is_no_member_of_its_group(tmp_path):
    """A failed scoring (None) is not a worst sample: rankings, group sizes and draws leave it out."""
    write_shard([row("a", [0.1, None, 0.5, 0.2]), row("one", [None, 0.7, None])], tmp_path)
    ids, counts = ranked_prompt_ids(str(tmp_path), k=3)
    assert ids == ["a"] and counts["unscored_images_left_out"] == 3 and counts["tied_groups_left_out"] == 1
    for seed in range(5):
        batch = group_batch([row("a", [0.1, None, 0.5, 0.2])], k=3, generator=torch.Generator().manual_seed(seed))
        members = sorted(int(drawn[0, 0].item()) // 8 for drawn in batch.latents[0])
        assert members == [0, 2, 3] and sorted(batch.rewards[0].tolist()) == pytest.approx([0.1, 0.2, 0.5])


def test_the_training_reader_yields_the_ranked_groups_training_columns_only(tmp_path):
    write_shard([row("a", [0.1, 0.9]), row("tie", [0.5, 0.5])], tmp_path)
    write_shard([row("b", [0.3, 0.7])], tmp_path)
    ids, _ = ranked_prompt_ids(str(tmp_path), k=2)
    for reference in REFERENCES:
        columns = training_columns(TrainConfig(reference=reference))
        tables = list(read_ranked_groups({"path": [str(path) for path in shard_paths(tmp_path)]}, ids, columns))
        assert sorted(pid for table in tables for pid in table.column("prompt_id").to_pylist()) == ["a", "b"]
        assert all(table.column_names == columns for table in tables)
    assert training_columns(TrainConfig(reference="cached")) == TRAINING_COLUMNS + CACHE_COLUMNS
    assert training_columns(TrainConfig(reward_weights={"a": 1})) == TRAINING_COLUMNS + ["reward_details"]


def test_small_groups_are_padded_and_masked_and_draws_keep_member_rewards(tmp_path):
    rows = [row("a", [0.1, 0.9, 0.5, 0.2]), row("small", [0.3, 0.7])]
    batch = group_batch(rows, k=3, generator=torch.Generator().manual_seed(0))
    assert batch.latents.shape == (2, 3, 4, 2) and batch.rewards.shape == (2, 3)
    assert batch.mask.tolist()[1] == [True, True, False]
    assert batch.mask[0].all()
    # Each drawn member keeps its own reward: member m's latents start at m * 8 in the fixture.
    for drawn, reward in zip(batch.latents[0], batch.rewards[0]):
        member = int(drawn[0, 0].item()) // 8
        assert reward.item() == pytest.approx([0.1, 0.9, 0.5, 0.2][member])
    assert batch.sampler == SamplerSettings(32, 32, num_steps=4, guidance_scale=2.0)  # the guidance it was made with


def test_unusable_datasets_are_refused(tmp_path):
    write_shard([row("a", [0.1, 0.9]), row("b", [0.2, 0.4])], tmp_path / "small")
    with pytest.raises(ValueError, match="k=6 but the groups .* hold at most 2 scored images"):
        ranked_prompt_ids(str(tmp_path / "small"), k=6)
    write_shard([row("tie", [0.5, 0.5])], tmp_path / "ties")
    with pytest.raises(ValueError, match="all-equal rewards"):
        ranked_prompt_ids(str(tmp_path / "ties"), k=2)


def test_too_few_groups_for_the_workers_is_refused():
    check_enough_groups(8, workers=2, groups_per_step=4)
    with pytest.raises(ValueError, match="2 workers x 4 groups per step need at least 8"):
        check_enough_groups(7, workers=2, groups_per_step=4)


def cached_row(prompt_id, rewards, draws=3):
    """A row whose reference velocity of member m at draw d is the constant 10 d + m."""
    tokens, channels = 4, 2
    velocities = (10 * torch.arange(draws).view(draws, 1, 1, 1) + torch.arange(len(rewards)).view(1, -1, 1, 1)
                  ).expand(draws, len(rewards), tokens, channels).to(torch.float16)
    data, shape, _ = tensor_to_bytes(velocities)
    return {**row(prompt_id, rewards, tokens, channels), "reference_timesteps": [0.1 * (d + 1) for d in range(draws)],
            "reference_noise_seeds": [100 + d for d in range(draws)], "reference_velocities": data,
            "reference_shape": shape}


def test_a_cached_batch_carries_one_draw_per_group_and_its_members_reference(tmp_path):
    rows = [cached_row("a", [0.1, None, 0.5, 0.2]), cached_row("small", [0.3, 0.7])]
    batch = group_batch(rows, k=3, generator=torch.Generator().manual_seed(0), cached=True)
    t, eps = batch.draws
    assert t.shape == (2,) and eps.shape == (2, 4, 2) and batch.reference.shape == (2, 3, 4, 2)
    for group, count in enumerate((3, 2)):
        draw = round(t[group].item() * 10) - 1  # which of the draws it took, from its t
        torch.testing.assert_close(eps[group], draw_noise(100 + draw, (4, 2)))  # eps regenerated from its seed
        for slot in range(count):  # each drawn member gets its own reference velocity at that draw
            member = int(batch.latents[group, slot, 0, 0].item()) // 8
            assert batch.reference[group, slot].unique().tolist() == [10 * draw + member]
        assert not batch.reference[group, count:].any()  # padding
    draws = {round(group_batch(rows, 3, torch.Generator().manual_seed(seed), cached=True).draws[0][0].item() * 10)
             for seed in range(20)}
    assert draws == {1, 2, 3}  # every cached draw gets used


def test_a_cache_that_does_not_fit_the_run_is_refused(tmp_path):
    (tmp_path / "cached").mkdir(), (tmp_path / "plain").mkdir()
    identity = {"model": "tiny", "revision": None, "reference_cache": cache_identity(4, "logit_normal")}
    write_manifest(tmp_path / "cached", identity, {}, complete=True)
    write_manifest(tmp_path / "plain", {"model": "tiny", "revision": None}, {}, complete=True)

    def config(data, **overrides):
        return TrainConfig(**{"data": str(tmp_path / data), "model": "tiny", "reference": "cached", **overrides})

    check_reference_cache(config("cached"))
    check_reference_cache(config("plain", reference="live"))  # live needs no cache
    with pytest.raises(ValueError, match="has no reference cache: make it with --reference-draws"):
        check_reference_cache(config("plain"))
    with pytest.raises(ValueError, match="made by model 'tiny' .* not this run's 'other/flux'"):
        check_reference_cache(config("cached", model="other/flux"))
    with pytest.raises(ValueError, match="drew t with 'logit_normal', this run with --timesteps 'uniform'"):
        check_reference_cache(config("cached", timesteps="uniform"))
    # A cache of an earlier round's policy serves only a run whose reference is that LoRA, and the other way round.
    (tmp_path / "lora").mkdir(), (tmp_path / "of-lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    lora = file_identity(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    write_manifest(tmp_path / "of-lora", {**identity, "reference_cache": cache_identity(4, "logit_normal", lora)}, {},
                   complete=True)
    check_reference_cache(config("of-lora", reference_lora=str(tmp_path / "lora")))
    with pytest.raises(ValueError, match="holds the LoRA .*'s velocities, this run's reference is the base model"):
        check_reference_cache(config("of-lora"))
    with pytest.raises(ValueError, match="holds the base model's velocities, this run's reference is the LoRA"):
        check_reference_cache(config("cached", reference_lora=str(tmp_path / "lora")))
    with pytest.raises(ValueError, match="a reference LoRA is read from the dataset's reference cache"):
        TrainConfig(reference_lora=str(tmp_path / "lora"))


def mixed_row(prompt_id, parts):
    """A row scored with the mix {"ocr": 1, "pick": 0.1}: its stored rewards are that mix of its parts."""
    rewards = [part["ocr"] + 0.1 * part["pick"] for part in parts]
    return {**row(prompt_id, rewards), "reward_details": [json.dumps({"parts": part, "details": {}}) for part in parts]}


MIX_SPEC = {"name": "mix", "parts": {"ocr": {"name": "ocr", "weight": 1.0}, "pick": {"name": "pickscore", "weight": 0.1}}}


def test_a_mixed_reward_dataset_is_ranked_again_from_its_parts(tmp_path):
    parts = [{"ocr": 1.0, "pick": 10.0}, {"ocr": 0.0, "pick": 30.0}, {"ocr": 0.5, "pick": 20.0}]
    tied_parts = [{"ocr": 1.0, "pick": 10.0}, {"ocr": 0.0, "pick": 20.0}]  # the stored mix ties: 2.0 and 2.0
    write_shard([mixed_row("a", parts), mixed_row("tie", tied_parts)], tmp_path)
    write_manifest(tmp_path, {"model": "tiny", "revision": None, "reward": MIX_SPEC}, {}, complete=True)
    assert ranked_prompt_ids(str(tmp_path), k=2)[0] == ["a"]
    config = resolve_ranking(TrainConfig(data=str(tmp_path), k=2, reward_normalise=True))
    assert config.reward_weights == {"ocr": 1.0, "pick": 0.1}  # the dataset's own mix
    ranking = Ranking.of(config)
    # Normalised over the group, ocr (+-1) outweighs pick (+-0.1): the tie is broken, "a" keeps its ranking.
    assert sorted(ranked_prompt_ids(str(tmp_path), k=2, ranking=ranking)[0]) == ["a", "tie"]
    assert ranking.rewards(mixed_row("tie", tied_parts)) == pytest.approx([0.9, -0.9])
    by_pick = Ranking({"pick": 1.0})
    batch = group_batch([mixed_row("a", parts)], k=3, generator=torch.Generator().manual_seed(0), ranking=by_pick)
    assert sorted(batch.rewards[0].tolist()) == [10.0, 20.0, 30.0]  # each member keeps its own part's value


def test_ranking_again_needs_a_mixed_dataset_and_its_parts(tmp_path):
    write_shard([row("a", [0.1, 0.9])], tmp_path / "plain")
    write_manifest(tmp_path / "plain", {"model": "tiny", "revision": None, "reward": {"name": "ocr"}}, {}, complete=True)
    with pytest.raises(ValueError, match="was scored with 'ocr' alone"):
        resolve_ranking(TrainConfig(data=str(tmp_path / "plain"), reward_weights={"ocr": 1.0}))
    write_shard([mixed_row("a", [{"ocr": 1.0, "pick": 1.0}, {"ocr": 0.0, "pick": 2.0}])], tmp_path / "mixed")
    write_manifest(tmp_path / "mixed", {"model": "tiny", "revision": None, "reward": MIX_SPEC}, {}, complete=True)
    with pytest.raises(ValueError, match=r"names parts \['hps'\]; .* has parts \['ocr', 'pick'\]"):
        resolve_ranking(TrainConfig(data=str(tmp_path / "mixed"), reward_weights={"hps": 1.0}))
    assert resolve_ranking(TrainConfig(data=str(tmp_path / "plain"))).reward_weights is None  # nothing to resolve
