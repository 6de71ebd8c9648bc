import os

import pytest
import torch

# Tests never touch the network: a hub lookup fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

from gdro_ray.models import FluxModel, TinyFluxConfig, build_tiny_flux_pipeline  # noqa: E402

IMAGE_SIZE = TinyFluxConfig().image_size


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
