"""The published numbers every model family's presets start from: the methods', not a model's.

A model family (gdro_ray/models/flux.py, sd3.py) adds its own schedule to these; the tiny world keeps its
measured values in gdro_ray/tiny_world/profile.py.
"""

# From the paper (GDRO, section 4): tau, gamma, beta and k per task, a LoRA of rank 32 with an EMA, 16 images
# generated a prompt (PAPER_IMAGES_PER_PROMPT), 512x512 images. Its beta is read here on the mean over
# latent elements, which is how public flow-DPO code reduces the velocity error (docs/internals.md, "Conventions").
FROM_THE_PAPER = {
    "ocr": dict(tau=0.05, gamma=0.5, beta=12.0, k=6, lora_rank=32),
    "geneval": dict(tau=0.05, gamma=1.0, beta=6.0, k=6, lora_rank=32),
}
TASKS = tuple(FROM_THE_PAPER)
PAPER_IMAGES_PER_PROMPT = 16
# The other objectives change the GDRO preset where their sources say so. "pl" is the paper's rank-loss ablation
# (only the loss changes) and "sft" uses neither beta nor gamma. Diffusion-DPO (Wallace et al., CVPR 2024) scales
# the mean velocity-error difference by beta_dpo / 2 with beta_dpo = 5000, so 2500 here, and has no fine-tuning
# term. DGPO's configs (config/dgpo.py, its OCR and GenEval runs) set beta_dpo = 100 on the same mean and weigh
# its KL to the reference, ||v_theta - v_ref||^2, by 0.02; its PPO clipping against the policy that sampled
# belongs to its online loop and is left out offline.
PAPER_OBJECTIVE_PRESETS = {"dpo": dict(beta=2500.0, gamma=0.0), "dgpo": dict(beta=100.0, gamma=0.0, kl=0.02)}
# The online baseline, from Flow-GRPO's published configs (config/base.py and config/grpo.py, its OCR and GenEval
# runs on SD3.5-Medium): the SDE's noise level 0.7, 10 sampler steps a rollout trained on int(10 x 0.99) = 9, PPO
# clip 1e-4, KL weight 0.04, lr 3e-4, LoRA rank 32 with alpha 64, groups of 16 (its 4-GPU configs; 24 on 8 GPUs).
# Steps: ours.
FLOW_GRPO = dict(noise_level=0.7, sample_steps=10, train_fraction=0.99, clip_range=1e-4, kl_beta=0.04, lr=3e-4,
                 lora_rank=32, lora_alpha=64.0)
PAPER_ONLINE_PRESETS = {task: {**FLOW_GRPO, "images_per_prompt": 16, "steps": 1000} for task in TASKS}


def task_presets(schedule: dict[str, dict]) -> dict[str, dict]:
    """The paper's GDRO values per task with a model family's schedule (steps, lr, alpha, ...) over them."""
    return {task: {**FROM_THE_PAPER[task], **schedule[task]} for task in TASKS}
