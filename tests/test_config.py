import argparse
import dataclasses

import pytest

from gdro_ray.config import TrainConfig, add_arguments, build_config, config_from_arguments, save_yaml
from gdro_ray.profiles import preset_values


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_arguments(parser.parse_args(argv))


@pytest.mark.parametrize("preset, task", [(p, t) for p in ("paper", "tiny") for t in ("ocr", "geneval")])
def test_every_shipped_preset_builds_a_valid_config(preset, task):
    config = parse(["--preset", preset, "--task", task])
    for name, value in preset_values(preset, task).items():
        assert getattr(config, name) == value


def test_the_preset_defaults_to_the_models_own(tiny_flux_dir):
    assert parse(["--task", "geneval"]).lora_rank == preset_values("tiny", "geneval")["lora_rank"]
    assert parse(["--task", "geneval", "--model", str(tiny_flux_dir)]).steps == preset_values("paper", "geneval")["steps"]


def test_paper_presets_are_the_papers_numbers():
    ocr, geneval = parse(["--preset", "paper", "--task", "ocr"]), parse(["--preset", "paper", "--task", "geneval"])
    assert (ocr.tau, ocr.gamma, ocr.beta, ocr.k, ocr.lr, ocr.lora_rank) == (0.05, 0.5, 12.0, 6, 3e-4, 32)
    assert (geneval.tau, geneval.gamma, geneval.beta, geneval.k) == (0.05, 1.0, 6.0, 6)
    assert ocr.steps == 300 and geneval.steps == 700


def test_each_objective_changes_the_preset_where_its_source_says(tmp_path):
    dpo = parse(["--preset", "paper", "--task", "ocr", "--objective", "dpo"])
    assert (dpo.objective, dpo.beta, dpo.gamma, dpo.k) == ("dpo", 2500.0, 0.0, 6)  # Diffusion-DPO's beta_dpo / 2
    dgpo = parse(["--preset", "paper", "--task", "geneval", "--objective", "dgpo"])
    assert (dgpo.beta, dgpo.gamma, dgpo.kl) == (100.0, 0.0, 0.02)  # DGPO's beta_dpo and KL weight
    tiny = parse(["--task", "geneval", "--objective", "dgpo"])
    assert (tiny.beta, tiny.gamma, tiny.kl) == (preset_values("tiny", "geneval")["beta"], 0.0, 0.02)  # the world's beta
    assert parse(["--task", "ocr", "--objective", "pl"]).gamma == preset_values("tiny", "ocr")["gamma"]
    assert parse(["--task", "ocr", "--objective", "dpo", "--gamma", "0.3"]).gamma == 0.3  # flags still win
    path = tmp_path / "run.yaml"
    path.write_text("objective: dpo\n")
    assert parse(["--task", "ocr", "--config", str(path)]).gamma == 0.0  # the file's objective picks the preset


def test_flags_override_yaml_which_overrides_the_preset(tmp_path):
    path = tmp_path / "run.yaml"
    save_yaml(TrainConfig(task="geneval", beta=3.0, steps=50), path)
    config = parse(["--preset", "paper", "--config", str(path), "--steps", "7", "--zero-stage", "3",
                    "--gradient-checkpointing", "true", "--max-workers", "4", "--resize-check-s", "5"])
    assert config.task == "geneval" and config.beta == 3.0  # the file beats the preset's 6
    assert config.steps == 7 and config.zero_stage == 3 and config.gradient_checkpointing is True
    assert config.max_workers == 4 and config.resize_check_s == 5.0


def test_config_round_trips_and_refuses_bad_values(tmp_path):
    config = TrainConfig(data="somewhere", beta=6.0)
    assert build_config(dataclasses.asdict(config)) == config
    with pytest.raises(ValueError, match="'beta' expects float, got str"):
        build_config({"beta": "large"})
    with pytest.raises(ValueError, match=r"unknown config fields \['betta'\]"):
        build_config({"betta": 1.0})
    with pytest.raises(ValueError, match="zero_stage must be 2 or 3"):
        TrainConfig(zero_stage=1)
    with pytest.raises(ValueError, match="k must be >= 2"):
        TrainConfig(k=1)
    for name, bad in (("beta", 0.0), ("tau", -0.1), ("lr", 0.0), ("beta", float("nan")), ("resize_check_s", 0.0)):
        with pytest.raises(ValueError, match=f"{name} must be > 0"):
            TrainConfig(**{name: bad})
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        TrainConfig(gamma=-1.0)
    with pytest.raises(ValueError, match="objective must be one of"):
        TrainConfig(objective="ppo")
    with pytest.raises(ValueError, match="sft objective runs no reference"):
        TrainConfig(objective="sft", kl=0.1)
    with pytest.raises(FileNotFoundError, match="neither a diffusers pipeline directory nor a hub id"):
        parse(["--model", str(tmp_path / "no-such-model")])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        parse(["--preset", "fast"])
