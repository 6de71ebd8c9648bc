"""What a model name means: the one place that answers it.

A model name is "tiny" (the tiny FLUX embedded in the package) or a real checkpoint (a diffusers directory
or a hub id of a known model family, gdro_ray/models). Everything that differs between them is a field of its
ModelProfile: where the weights are, how to sample by default, the training presets, the prompt set and the
reward of each task, and the default quality judge. The tiny world's answers live in
gdro_ray/tiny_world/profile.py; the rest of the package asks here and never branches on a model name.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from gdro_ray.cli import option
from gdro_ray.data.prompts import PROMPT_SETS, PromptRecord, load_prompts, prompt_file_kind
from gdro_ray.models import ModelFamily, SamplerSettings, family_of, model_families
from gdro_ray.presets import FLOW_GRPO, PAPER_IMAGES_PER_PROMPT, PAPER_OBJECTIVE_PRESETS, TASKS
from gdro_ray.rewards import DEFAULT_SPECS, MIX, check_mix
from gdro_ray.rewards.quality import QualityJudge
from gdro_ray.rewards.vlm_judge import JUDGE_MODES

DEFAULT_MODEL = "tiny"


@dataclass(frozen=True)
class ModelProfile:
    weights: str  # a diffusers directory or a hub id
    sampler: SamplerSettings  # how to sample when nothing else is asked
    preset: str  # the name of its training presets
    presets: Mapping[str, dict]  # task -> TrainConfig values
    objective_presets: Mapping[str, dict]  # objective -> the values it changes in a task's preset
    online_presets: Mapping[str, dict]  # task -> OnlineConfig values (the online baseline)
    images_per_prompt: int  # images generated a training prompt (k_gen): training draws k of them
    prompt_sets: Mapping[str, Callable[[int], Iterator[PromptRecord]]]  # task -> seed -> prompts
    rewards: Mapping[str, dict]  # task -> reward spec (gdro_ray.rewards.build_reward)
    judge: Callable[[], QualityJudge] | None  # the quality judge when none is given; None: one must be

    def prompts(self, task: str, *, split: str, num_prompts: int | None, seed: int,
                prompt_file: str | None = None) -> list[PromptRecord]:
        """The first prompts of one split of a task's prompt set, or of a prompt file (with task "custom", or
        with the task whose prompts the file holds)."""
        if prompt_file is not None:
            check_prompt_file(task, prompt_file)
            return load_prompts("custom", path=prompt_file, num_prompts=num_prompts, seed=seed, split=split)
        if task == "custom":
            raise ValueError("the custom task reads its prompts from a file: pass a prompt file")
        if task not in self.prompt_sets:
            raise ValueError(f"unknown task {task!r}; known: {sorted(self.prompt_sets) + ['custom']}")
        return load_prompts(self.prompt_sets[task], num_prompts=num_prompts, seed=seed, split=split)

    def reward_spec(self, task: str, prompt_file: str | None = None, overrides: dict | None = None) -> dict:
        """The full reward spec of a task, options given in overrides replacing the defaults; a custom prompt
        file is scored by its format (.txt OCR, .jsonl GenEval)."""
        name = task
        if task == "custom":
            if prompt_file is None:
                raise ValueError("the custom task needs a prompt file (.txt for OCR, .jsonl for GenEval)")
            name = prompt_file_kind(prompt_file)
        elif prompt_file is not None:
            check_prompt_file(task, prompt_file)
        overrides = overrides or {}
        name = overrides.get("name", name)
        if name == MIX:  # each part completed as a reward of its own
            return {**check_mix(overrides), "parts": {label: self._full_spec(part.get("name", label), part)
                                                      for label, part in overrides["parts"].items()}}
        return self._full_spec(name, overrides)

    def _full_spec(self, name: str, overrides: dict) -> dict:
        known = {**DEFAULT_SPECS, **self.rewards}
        if name not in known:
            raise ValueError(f"no reward for {name!r}; known rewards: {sorted(known)} and {MIX!r}")
        return {**known[name], **overrides, "name": name}


def family_profile(model: str, family: ModelFamily) -> ModelProfile:
    """A real checkpoint's profile: its family's sampler and presets, the benchmarks' prompts and rewards."""
    return ModelProfile(
        weights=model,
        sampler=family.sampler,
        preset=family.preset,
        presets=family.presets,
        objective_presets=PAPER_OBJECTIVE_PRESETS,
        online_presets=family.online_presets,
        images_per_prompt=PAPER_IMAGES_PER_PROMPT,
        prompt_sets=PROMPT_SETS,
        rewards={task: DEFAULT_SPECS[task] for task in TASKS},
        judge=None,
    )


def check_prompt_file(task: str, prompt_file: str) -> None:
    """A prompt file given with a task must hold that task's prompts."""
    kind = prompt_file_kind(prompt_file)
    if task != "custom" and kind != task:
        raise ValueError(f"prompt file {prompt_file!r} holds {kind} prompts, but the task is {task!r}: "
                         f"use a {'.txt' if task == 'ocr' else '.jsonl'} file or --task {kind}")


def profile_for(model: str) -> ModelProfile:
    """The profile of a model name; a real checkpoint that is neither a directory nor a hub id is refused."""
    if model == DEFAULT_MODEL:
        from gdro_ray.tiny_world import profile as tiny

        return ModelProfile(tiny.WEIGHTS, tiny.SAMPLER, tiny.PRESET, tiny.PRESETS, tiny.OBJECTIVE_PRESETS,
                            {task: {**FLOW_GRPO, **values} for task, values in tiny.ONLINE_PRESETS.items()},
                            tiny.IMAGES_PER_PROMPT, tiny.PROMPT_SETS, tiny.REWARDS, tiny.quality_judge)
    return family_profile(model, family_of(model))


def preset_values(preset: str, task: str, objective: str = "gdro") -> dict:
    """The TrainConfig values of a named preset ("paper", "tiny") for a task and an objective."""
    profile = _preset_profile(preset)
    return {**_task_values(preset, profile.presets, task), **profile.objective_presets.get(objective, {}),
            "objective": objective}


def online_preset_values(preset: str, task: str) -> dict:
    """The OnlineConfig values of a named preset ("paper", "tiny") for a task."""
    return _task_values(preset, _preset_profile(preset).online_presets, task)


def _preset_profile(preset: str) -> ModelProfile:
    profiles = {family.preset: family_profile(family.name, family) for family in model_families().values()}
    profiles[profile_for(DEFAULT_MODEL).preset] = profile_for(DEFAULT_MODEL)
    if preset not in profiles:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(profiles)}")
    return profiles[preset]


def _task_values(preset: str, presets: Mapping[str, dict], task: str) -> dict:
    if task not in presets:
        raise ValueError(f"preset {preset!r} has no settings for task {task!r}; it has {sorted(presets)}")
    return dict(presets[task])


@dataclass
class JudgeSettings:
    """Which quality judge rates the images (quality_judge), as the flags of the jobs that evaluate."""

    judge_url: str | None = option(None, "an HTTP quality judge (see gdro_ray/rewards/http_judge.py)")
    judge_token_env: str | None = option(None, "environment variable holding the judge's token")
    judge_model: str | None = option(None, "a vision-language judge: hub id or local directory")
    judge_mode: str = option("single", "the vision-language judge's ratings: one, or the paper's three "
                                       "(alignment, coherence, style) averaged", choices=JUDGE_MODES)

    def judge(self) -> dict:
        """Keyword arguments of quality_judge."""
        return {"judge_url": self.judge_url, "token_env": self.judge_token_env, "judge_model": self.judge_model,
                "judge_mode": self.judge_mode}


def quality_judge(model: str, judge_url: str | None = None, token_env: str | None = None,
                  judge_model: str | None = None, judge_mode: str = "single") -> QualityJudge:
    """The HTTP judge when a URL is given, a vision-language judge when a judge model (hub id or directory) is
    (judge_mode: one rating, or the paper's three), else the model's own default judge."""
    if judge_url and judge_model:
        raise ValueError("pass a judge URL or a judge model, not both")
    if judge_mode != "single" and not judge_model:
        raise ValueError(f"--judge-mode {judge_mode} rates with a vision-language judge: pass --judge-model too")
    if judge_url:
        from gdro_ray.rewards.http_judge import HTTPJudge

        return HTTPJudge(judge_url, token_env=token_env)
    if judge_model:
        from gdro_ray.rewards.vlm_judge import VLMJudge  # loads its model lazily, on the first rating

        return VLMJudge(judge_model, mode=judge_mode)
    default = profile_for(model).judge
    if default is None:
        raise ValueError("a real model needs a quality judge: pass --judge-url (a scoring server, see README) "
                         "or --judge-model")
    return default()
