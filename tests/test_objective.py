import itertools
import math

import pytest
import torch

from gdro_ray.objective import (
    ADVANTAGE_CLIP,
    GROUP_LOSSES,
    best_worst_dpo_loss,
    dgpo_loss,
    dpo_loss,
    gdro_loss,
    group_advantages,
    group_loss,
    implicit_reward,
    plackett_luce_loss,
    rank_by_reward,
    reference_regulariser,
    top1_regulariser,
    velocity_error,
)


def random_groups(groups=8, k=6, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(groups, k, generator=generator, dtype=dtype) * 3
    rewards = torch.rand(groups, k, generator=generator, dtype=dtype)
    return scores, rewards


def brute_force_ranking_nll(scores, ranking):
    """-log P(ranking) under Plackett-Luce: product over ranks of exp(s_i) / sum over the rest."""
    nll = 0.0
    for position in range(len(ranking) - 1):
        rest = ranking[position:]
        nll -= scores[ranking[position]] - math.log(sum(math.exp(scores[m]) for m in rest))
    return nll


def test_hand_worked_gdro_value():
    # k = 3, s = (0, 0, 0), rewards (1, 0, 0), tau = 1.
    # Rank 1: lse(0,0,0) = log 3, expected score 0 -> log 3. Rank 2: lse(0,0) = log 2 -> log 2.
    scores = torch.zeros(1, 3, dtype=torch.float64)
    rewards = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    assert gdro_loss(scores, rewards, tau=1.0).item() == pytest.approx(math.log(3) + math.log(2))
    # s = (1, 0, 0), tau = 1: q_1 = softmax(1, 0, 0); rank 1 = log(e + 2) - q_1(1) * 1; rank 2 = log 2.
    scores = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    q_top = math.e / (math.e + 2)
    expected = math.log(math.e + 2) - q_top + math.log(2)
    assert gdro_loss(scores, rewards, tau=1.0).item() == pytest.approx(expected)


def test_k2_small_tau_equals_diffusion_dpo():
    scores, rewards = random_groups(groups=64, k=2, seed=1)
    rewards[:, 1] = rewards[:, 0] - 0.05 - rewards[:, 1] * 0.5  # member 0 wins, by at least 0.05
    rewards = rewards[:, torch.randperm(2)]  # but not always in slot 0
    winner = rewards.argmax(-1, keepdim=True)
    loser = 1 - winner
    expected = dpo_loss(scores.gather(-1, winner), scores.gather(-1, loser)).squeeze(-1)
    actual = gdro_loss(scores, rewards, tau=1e-4)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_plackett_luce_equals_brute_force_likelihood(k):
    scores, rewards = random_groups(groups=5, k=k, seed=k)
    losses = plackett_luce_loss(scores, rewards)
    for group in range(scores.shape[0]):
        ranking = sorted(range(k), key=lambda j: -rewards[group, j].item())
        expected = brute_force_ranking_nll(scores[group].tolist(), ranking)
        assert losses[group].item() == pytest.approx(expected, abs=1e-10)
        # The likelihoods of all k! rankings sum to one, so the model is a distribution over rankings.
    total = sum(
        math.exp(-brute_force_ranking_nll(scores[0].tolist(), list(p))) for p in itertools.permutations(range(k))
    )
    assert total == pytest.approx(1.0)


def test_gdro_tends_to_plackett_luce_as_tau_shrinks():
    scores, rewards = random_groups(groups=6, k=5, seed=3)
    torch.testing.assert_close(gdro_loss(scores, rewards, tau=1e-5), plackett_luce_loss(scores, rewards))
    assert not torch.allclose(gdro_loss(scores, rewards, tau=1.0), plackett_luce_loss(scores, rewards))


@pytest.mark.parametrize("loss", [*GROUP_LOSSES, "top1"])
def test_permuting_members_with_rewards_leaves_loss_unchanged(loss):
    scores, rewards = random_groups(groups=4, k=6, seed=5)
    mask = torch.ones_like(rewards, dtype=torch.bool)
    mask[1, 4:] = False
    functions = {name: lambda s, r, m, name=name: group_loss(name, s, r, 0.3, m) for name in GROUP_LOSSES}
    functions["top1"] = lambda s, r, m: top1_regulariser(s.abs(), r, mask=m)
    before = functions[loss](scores, rewards, mask)
    permutation = torch.randperm(6, generator=torch.Generator().manual_seed(7))
    after = functions[loss](scores[:, permutation], rewards[:, permutation], mask[:, permutation])
    torch.testing.assert_close(after, before)


def test_dpo_takes_each_groups_best_and_worst_member():
    scores, rewards = random_groups(groups=5, k=6, seed=21)
    mask = torch.ones_like(rewards, dtype=torch.bool)
    mask[3, 4:] = False  # the worst of group 3 is among its first four
    expected = []
    for s, r, m in zip(scores, rewards, mask):
        members = m.nonzero().squeeze(-1)
        best, worst = members[r[members].argmax()], members[r[members].argmin()]
        expected.append(dpo_loss(s[best], s[worst]))
    torch.testing.assert_close(best_worst_dpo_loss(scores, rewards, mask), torch.stack(expected))
    tied = torch.full((1, 4), 0.5, dtype=torch.float64)
    assert best_worst_dpo_loss(scores[:1, :4], tied).item() == 0.0  # no preference, no loss


def test_advantages_are_normalised_over_each_groups_members():
    _, rewards = random_groups(groups=4, k=6, seed=23)
    mask = torch.ones_like(rewards, dtype=torch.bool)
    mask[2, 3:] = False
    advantages = group_advantages(rewards, mask)
    assert (advantages[2, 3:] == 0).all()
    for a, m in zip(advantages, mask):
        assert a[m].mean().item() == pytest.approx(0.0, abs=1e-9)
        assert a[m].std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)  # population std, + 1e-4
    outlier = torch.tensor([[1.0] + [0.0] * 99], dtype=torch.float64)  # one in a hundred: sqrt(99) std units
    assert group_advantages(outlier)[0, 0].item() == ADVANTAGE_CLIP


def test_hand_worked_dgpo_value_and_direction():
    # k = 2 with rewards (1, 0): advantages (1, -1) (up to the 1e-4), so the margin is (s_1 - s_2) / 2.
    scores = torch.tensor([[0.8, -0.4]], dtype=torch.float64)
    rewards = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    expected = -torch.nn.functional.logsigmoid(torch.tensor(0.6 / (1 + 2e-4), dtype=torch.float64))
    assert dgpo_loss(scores, rewards).item() == pytest.approx(expected.item())
    # A gradient step raises the implicit reward of members above the group's mean and lowers those below.
    _, rewards = random_groups(groups=8, k=6, seed=29)
    free = torch.zeros_like(rewards, requires_grad=True)
    dgpo_loss(free, rewards).sum().backward()
    above = rewards > rewards.mean(-1, keepdim=True)
    assert (free.grad[above] < 0).all() and (free.grad[~above] > 0).all()


def test_the_reference_regulariser_averages_each_groups_members():
    distances = torch.tensor([[1.0, 2.0, 3.0], [4.0, 8.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert reference_regulariser(distances, mask).tolist() == [2.0, 6.0]
    assert reference_regulariser(distances).tolist() == pytest.approx([2.0, 112 / 3])


def test_autograd_matches_finite_differences():
    scores, rewards = random_groups(groups=3, k=5, seed=11)
    mask = torch.ones_like(rewards, dtype=torch.bool)
    mask[2, 3:] = False
    scores.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: gdro_loss(s, rewards, tau=0.2, mask=mask), (scores,))
    for name in ("pl", "dpo", "dgpo"):
        assert torch.autograd.gradcheck(lambda s: group_loss(name, s, rewards, 1.0, mask), (scores,))

    # Through the implicit reward too: gradients reach the policy errors with the factor -beta.
    generator = torch.Generator().manual_seed(12)
    policy = torch.rand(3, 5, dtype=torch.float64, generator=generator).requires_grad_(True)
    reference = torch.rand(3, 5, dtype=torch.float64, generator=generator)

    def objective(policy_errors):
        s = implicit_reward(policy_errors, reference, beta=7.0)
        return gdro_loss(s, rewards, 0.05, mask) + 0.5 * top1_regulariser(policy_errors, rewards, mask)

    assert torch.autograd.gradcheck(objective, (policy,))


@pytest.mark.parametrize("beta", [1.0, 1e2, 1e4])
def test_finite_for_large_beta_ties_and_masks(beta):
    generator = torch.Generator().manual_seed(13)
    policy = torch.rand(4, 6, generator=generator).requires_grad_(True)
    reference = torch.rand(4, 6, generator=generator)
    rewards = torch.rand(4, 6, generator=generator)
    rewards[0] = 0.5  # all equal
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2, 1:] = False  # a group of one: no ranking to learn, zero loss
    scores = implicit_reward(policy, reference, beta)
    scores = scores.masked_fill(~mask, float("nan"))  # padding may hold garbage
    per_group = sum(group_loss(name, scores, rewards, 0.05, mask) for name in GROUP_LOSSES)
    per_group.sum().backward()
    assert torch.isfinite(per_group).all()
    assert per_group[2] == 0
    assert torch.isfinite(policy.grad).all()
    assert (policy.grad[1, 2:] == 0).all() and (policy.grad[2] == 0).all()


def test_gradient_steps_raise_top_and_lower_last():
    # Free scores start equal, as at a fresh LoRA where policy == reference.
    _, rewards = random_groups(groups=16, k=6, seed=17, dtype=torch.float32)
    scores = torch.zeros_like(rewards, requires_grad=True)
    order = rank_by_reward(rewards)
    optimizer = torch.optim.SGD([scores], lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        gdro_loss(scores, rewards, tau=0.05).mean().backward()
        optimizer.step()
    change = scores.detach().gather(-1, order)
    assert (change[:, 0] > 0).all()
    assert (change[:, -1] < 0).all()


def test_ties_rank_in_member_order():
    rewards = torch.tensor([[0.2, 0.9, 0.2, 0.9, 0.1]])
    assert rank_by_reward(rewards).tolist() == [[1, 3, 0, 2, 4]]
    mask = torch.tensor([[True, False, True, True, True]])
    assert rank_by_reward(rewards, mask).tolist() == [[3, 0, 2, 4, 1]]


def test_top1_regulariser_picks_best_member_error():
    errors = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    rewards = torch.tensor([[0.0, 1.0, 0.5], [0.9, 0.2, 1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert top1_regulariser(errors, rewards, mask).tolist() == pytest.approx([0.2, 0.4])


def test_velocity_error_reductions_and_precision():
    prediction = torch.full((2, 4, 3), 1.5, dtype=torch.bfloat16)
    target = torch.ones(2, 4, 3, dtype=torch.bfloat16)
    assert velocity_error(prediction, target, "mean").dtype == torch.float32
    assert velocity_error(prediction, target, "mean").tolist() == [0.25, 0.25]
    assert velocity_error(prediction, target, "sum").tolist() == [3.0, 3.0]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, r: gdro_loss(s, r, tau=0.0), "tau must be > 0"),
        (lambda s, r: gdro_loss(s, r, tau=-1.0), "tau must be > 0"),
        (lambda s, r: implicit_reward(s, r, beta=0.0), "beta must be > 0"),
        (lambda s, r: gdro_loss(s[:, :1], r[:, :1], tau=0.1), "k >= 2"),
        (lambda s, r: gdro_loss(s, r.index_fill(1, torch.tensor([2]), float("nan")), tau=0.1), "NaN"),
        (lambda s, r: velocity_error(s, r, reduction="max"), "reduction must be one of"),
        (lambda s, r: gdro_loss(s, r, tau=0.1, mask=torch.ones_like(s)), "bool tensor"),
        (lambda s, r: group_loss("ppo", s, r, 0.1), "no group loss named 'ppo'"),
        (lambda s, r: dgpo_loss(s, r.index_fill(1, torch.tensor([0]), float("nan"))), "NaN"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(call, message):
    scores, rewards = random_groups(groups=2, k=4)
    with pytest.raises(ValueError, match=message):
        call(scores, rewards)
