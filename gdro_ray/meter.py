"""One compute meter for every method, counted by the code as the work happens:

    forward_passes   images through the transformer (a batch of 8 counts 8; a backward counts as two forwards)
    reward_calls     images scored by the task reward
    seconds          wall seconds per stage (generation, scoring, training)

A forward hook on the transformer counts every forward: sampling steps, the policy and the reference in
training, classifier-free guidance's second pass. Recomputation by gradient checkpointing is not counted.
Held-out evaluation is not a method's cost and runs unmetered.
"""

import contextlib
import time
from dataclasses import dataclass, field

import torch


@dataclass
class ComputeMeter:
    forward_passes: int = 0
    reward_calls: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    counting: bool = field(default=True, repr=False, compare=False)

    def watch(self, transformer: torch.nn.Module):
        """Count the transformer's forwards from now on; returns the hook's handle (remove() stops it)."""

        def count(module, args, kwargs, output):
            if self.counting:
                latents = kwargs.get("hidden_states", args[0] if args else None)
                self.forward_passes += int(latents.shape[0])

        return transformer.register_forward_hook(count, with_kwargs=True)

    def backward(self, images: int) -> None:
        self.forward_passes += 2 * images

    def scored(self, images: int) -> None:
        self.reward_calls += images

    @contextlib.contextmanager
    def paused(self):
        """Forwards within this context are not counted (held-out evaluation)."""
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    @contextlib.contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def add(self, other: "ComputeMeter | dict") -> "ComputeMeter":
        """This meter plus another's counts (a meter or its as_dict())."""
        other = other if isinstance(other, ComputeMeter) else ComputeMeter(**other)
        seconds = dict(self.seconds)
        for name, value in other.seconds.items():
            seconds[name] = seconds.get(name, 0.0) + value
        return ComputeMeter(self.forward_passes + other.forward_passes, self.reward_calls + other.reward_calls,
                            seconds)

    def as_dict(self) -> dict:
        return {"forward_passes": self.forward_passes, "reward_calls": self.reward_calls, "seconds": dict(self.seconds)}

    def metrics(self) -> dict:
        """Flat, for metric reports: compute_forward_passes, compute_reward_calls, compute_seconds_STAGE."""
        return {"compute_forward_passes": self.forward_passes, "compute_reward_calls": self.reward_calls,
                **{f"compute_seconds_{name}": value for name, value in self.seconds.items()}}

    @classmethod
    def from_metrics(cls, metrics: dict) -> "ComputeMeter":
        """The meter a metrics() report came from (other metrics are ignored)."""
        prefix = "compute_seconds_"
        return cls(int(metrics.get("compute_forward_passes", 0)), int(metrics.get("compute_reward_calls", 0)),
                   {name.removeprefix(prefix): float(value) for name, value in metrics.items()
                    if name.startswith(prefix)})

    @classmethod
    def reported(cls, scalars: dict) -> "ComputeMeter":
        """The totals of a training run's last report, from its TensorBoard scalars (tag -> (steps, values))."""
        return cls.from_metrics({tag.removeprefix("train/"): values[-1] for tag, (_, values) in scalars.items()
                                 if tag.startswith("train/compute_")})
