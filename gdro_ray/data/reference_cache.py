"""Reference velocities computed once, where the groups are made, so that training never runs the reference.

GDRO's implicit reward compares the policy's velocity error with the reference's at the same noised member.
The reference's velocity depends on the member's latent, (t, eps), the prompt and the sampler's conditioning, and
never on the LoRA being trained. So generation draws M (t, eps) pairs per group, shared by its members as
training shares one per group, and stores every member's reference velocity at each draw:

    reference_timesteps     (M,)                  t of each draw
    reference_noise_seeds   (M,)                  eps of each draw, as the seed of a CPU generator (exact anywhere)
    reference_velocities    (M, k_gen, N, C)      float16, the model without any LoRA

Training picks one of the M draws per group and step (``cached_draw``) and skips the reference forward.
"""

import torch

from gdro_ray.data.records import tensor_from_bytes, tensor_to_bytes
from gdro_ray.flow import TimestepSampler, noisy_latents, sample_timesteps
from gdro_ray.models.base import FlowModel, PromptEmbeddings, SamplerSettings

CACHE_COLUMNS = ["reference_timesteps", "reference_noise_seeds", "reference_velocities", "reference_shape"]
CACHE_DTYPE = torch.float16  # half the bytes; its 11-bit mantissa keeps the implicit reward's difference intact


def cache_identity(draws: int, timesteps: str, lora: dict | None = None) -> dict:
    """What a dataset's cache was made with (in its manifest): training may use it only with the same sampler of t
    and the same reference, the base model or (lora: its weights' identity) the base with that LoRA."""
    policy = {"lora": lora} if lora else {}  # the base model's cache keeps the identity it always had
    return {"draws": draws, "timesteps": timesteps, "dtype": str(CACHE_DTYPE).removeprefix("torch."), **policy}


def draw_noise(seed: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The eps of a cached draw: float32 on the CPU, the same on every machine."""
    return torch.randn(latent_shape, generator=torch.Generator("cpu").manual_seed(int(seed)))


@torch.no_grad()
def reference_draws(model: FlowModel, latents: torch.Tensor, prompt: PromptEmbeddings, sampler: SamplerSettings,
                    timesteps: TimestepSampler, timestep_seed: int, noise_seeds: list[int]) -> dict:
    """The cache columns of one group: latents (k, N, C) of one prompt, one draw per noise seed."""
    t = sample_timesteps(len(noise_seeds), timesteps, torch.Generator("cpu").manual_seed(int(timestep_seed)))
    members = prompt.select([0] * len(latents))
    velocities = []
    for draw_t, seed in zip(t, noise_seeds):  # one forward of the group per draw: generation's batch size
        eps = draw_noise(seed, tuple(latents.shape[1:])).to(latents.device)
        x_t = noisy_latents(latents.float(), eps.expand_as(latents), draw_t.expand(len(latents)))
        velocities.append(model.velocity(x_t, draw_t.expand(len(latents)), members, sampler).to("cpu", CACHE_DTYPE))
    data, shape, _ = tensor_to_bytes(torch.stack(velocities))
    return {"reference_timesteps": t.tolist(), "reference_noise_seeds": [int(s) for s in noise_seeds],
            "reference_velocities": data, "reference_shape": shape}


def cached_draw(row: dict, members: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One of a group row's cached draws, picked with generator: t (scalar), eps (N, C) and the reference
    velocities of the given members (indices into the row's k_gen images), float16."""
    draws, *shape = row["reference_shape"]
    draw = int(torch.randint(draws, (), generator=generator))
    size = len(row["reference_velocities"]) // draws  # the draws lie one after the other: decode one
    velocities = tensor_from_bytes(row["reference_velocities"][draw * size:(draw + 1) * size], shape,
                                   str(CACHE_DTYPE).removeprefix("torch."))
    t = torch.tensor(row["reference_timesteps"][draw], dtype=torch.float32)
    return t, draw_noise(row["reference_noise_seeds"][draw], tuple(shape[1:])), velocities[members]
