import importlib.util
import os
import socket
from pathlib import Path

# Tests never touch the network: a hub lookup fails fast instead of waiting for its timeouts. Set before
# huggingface_hub is imported (by transformers, diffusers), which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPConfig, CLIPModel, CLIPProcessor  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

torch.set_num_threads(2)

from gdro_ray.models import FluxModel, SamplerSettings  # noqa: E402
from gdro_ray.ray_session import init_ray  # noqa: E402
from gdro_ray.tiny_world.model import TinyFluxConfig, build_clip_tokenizer, build_tiny_flux_pipeline  # noqa: E402

IMAGE_SIZE = TinyFluxConfig().image_size


def sampler(num_steps: int = 2, **settings) -> SamplerSettings:
    """Sampler settings at the tiny pipeline's image size."""
    return SamplerSettings(IMAGE_SIZE, IMAGE_SIZE, num_steps, **settings)
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port nothing listens on now (a fixed one may be another test run's)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for a test module, started as the jobs start it (the dashboard as tune/sweep.py has it:
    Ray Train frees stopped trials' workers through it)."""
    init_ray(dashboard=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def load_script():
    """Import an entry point of the repo (e.g. "jobs/align.py") as a module: jobs/ and tune/ are scripts,
    not packages."""

    def load(relative_path: str):
        path = REPO / relative_path
        spec = importlib.util.spec_from_file_location(path.parent.name + "_" + path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny FLUX pipeline saved like any diffusers checkpoint."""
    directory = tmp_path_factory.mktemp("tiny-flux")
    build_tiny_flux_pipeline(seed=0).save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_flux(tiny_flux_dir):
    """A fresh FluxModel on the tiny pipeline, loaded from disk (fp32, CPU)."""
    return FluxModel.from_pretrained(str(tiny_flux_dir), device="cpu")


def tiny_clip_parts():
    """A CLIP model of a few thousand random weights and its processor: the architecture of the CLIP rewards'."""
    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
        ),
        projection_dim=8,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
