"""The compute meter counts what runs through the transformer, and nothing while paused."""

import torch

from gdro_ray.meter import ComputeMeter


class Denoiser(torch.nn.Module):
    def forward(self, hidden_states, timestep=None):
        return hidden_states * 2


def test_forwards_are_counted_per_image_and_backwards_as_two():
    meter, module = ComputeMeter(), Denoiser()
    handle = meter.watch(module)
    module(hidden_states=torch.zeros(6, 4, 3))
    module(torch.zeros(2, 4, 3))
    with meter.paused():
        module(hidden_states=torch.zeros(5, 4, 3))
    meter.backward(6)
    meter.scored(8)
    assert (meter.forward_passes, meter.reward_calls) == (6 + 2 + 12, 8)
    handle.remove()
    module(hidden_states=torch.zeros(3, 4, 3))
    assert meter.forward_passes == 20


def test_stages_time_and_totals_add_up_and_round_trip_through_metrics():
    meter = ComputeMeter(10, 2)
    with meter.stage("training"):
        pass
    total = meter.add({"forward_passes": 5, "reward_calls": 1, "seconds": {"training": 1.5, "generation": 2.0}})
    assert (total.forward_passes, total.reward_calls, total.seconds["generation"]) == (15, 3, 2.0)
    assert total.seconds["training"] >= 1.5
    assert ComputeMeter.from_metrics({**total.metrics(), "loss": 0.3}) == total
