"""Tests of longtail/functional/eqlv2.py: EQL v2 weights, loss, gradient statistics and scores.

Expected numbers are either pinned from the worked examples and reference points of the EQL v2
spec (§2.2, §6) or computed here independently (plain Python ``math`` loops in float64, or
autograd on a weighted BCE written out in this file); none are produced by the module under test.
The key check is :func:`test_grad_increments_match_autograd`: the statistics the module computes
in closed form must equal what the authors' backward hook would collect, i.e. ``|dL/dz|`` of the
weighted BCE split by target.
"""

import io
import math
import random

import pytest
import torch
import torch.nn.functional as F

from longtail.functional.eqlv2 import (
    EQLv2GradIncrements,
    EQLv2Weights,
    eqlv2_grad_increments,
    eqlv2_loss,
    eqlv2_probs,
    eqlv2_weights,
)

GAMMA, MU, ALPHA = 12.0, 0.8, 4.0


def _close(actual, expected, atol, rtol=0.0):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _bce(x, y):
    """Plain-math BCE on a logit x with a (possibly soft) target y, stable for large |x|."""
    return max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))


def _dense(labels, num_cols):
    return [[1.0 if c == label else 0.0 for c in range(num_cols)] for label in labels]


def _reference_weights(pos_grad, neg_grad, gamma=GAMMA, mu=MU, alpha=ALPHA):
    """Spec §2.2-2.3 with Python floats, including the unit weights of a fresh state."""
    if all(v == 0 for v in list(pos_grad) + list(neg_grad)):
        n = len(pos_grad) + 1
        return [1.0] * n, [1.0] * n
    r = [_sigmoid(gamma * (p / (n + 1e-10) - mu)) for p, n in zip(pos_grad, neg_grad)]
    q = [1.0 + alpha * (1.0 - x) for x in r]
    return q + [1.0], r + [1.0]


def _reference_loss(z, t, q, r):
    """(1/R) sum_r sum_j W BCE(z, T), W = q T + r (1 - T), with Python floats."""
    total = 0.0
    for row, trow in zip(z, t):
        for j, (x, y) in enumerate(zip(row, trow)):
            total += (q[j] * y + r[j] * (1.0 - y)) * _bce(x, y)
    return total / len(z)


def _reference_increments(z, t, q, r):
    """p_j, n_j = sum_r |sigmoid(z) - T| W T (resp. 1 - T), j < C, with Python floats."""
    num_fg = len(q) - 1
    pos, neg = [0.0] * num_fg, [0.0] * num_fg
    for row, trow in zip(z, t):
        for j in range(num_fg):
            x, y = row[j], trow[j]
            gw = abs(_sigmoid(x) - y) * (q[j] * y + r[j] * (1.0 - y))
            pos[j] += gw * y
            neg[j] += gw * (1.0 - y)
    return pos, neg


def _random_stats(rng, num_fg):
    """Accumulated statistics covering tail (P << Q), head (P ~ Q) and unseen (P = 0) classes."""
    pos = [rng.choice([0.0, rng.uniform(0.0, 5.0), rng.uniform(0.0, 500.0)]) for _ in range(num_fg)]
    neg = [rng.uniform(0.1, 50.0) for _ in range(num_fg)]
    return pos, neg


def _random_soft_targets(rng, labels, num_cols):
    """PCB-style soft rows: fractional mass on the class columns of fg RoIs, one-hot bg rows."""
    out = []
    for label in labels:
        if label == num_cols - 1:
            out.append([0.0] * (num_cols - 1) + [1.0])
        else:
            row = [rng.uniform(0.0, 0.3) for _ in range(num_cols - 1)] + [0.0]
            row[label] = rng.uniform(0.5, 1.0)
            out.append(row)
    return out


# ---------------------------------------------------------------- mapping (spec §2.2)


def test_mapping_reference_points():
    # g = P / (Q + 1e-10) = mu, 1 and 0 for the three classes.
    w = eqlv2_weights(torch.tensor([MU, 1.0, 0.0]), torch.ones(3))
    assert isinstance(w, EQLv2Weights)
    assert w.pos.shape == (4,) and w.neg.shape == (4,)
    assert w.pos.dtype == torch.float64 and w.neg.dtype == torch.float64
    _close(w.neg, [0.5, 0.916827, 6.7724e-5, 1.0], atol=1e-6)
    _close(w.pos, [3.0, 1.332691, 4.999729, 1.0], atol=1e-6)


def test_weights_match_independent_formula():
    rng = random.Random(1)
    pos, neg = _random_stats(rng, 40)
    for gamma, mu, alpha in [(GAMMA, MU, ALPHA), (3.0, 0.2, 1.5), (20.0, 1.5, 0.0)]:
        w = eqlv2_weights(torch.tensor(pos), torch.tensor(neg), gamma, mu, alpha)
        # float32 statistics (as given here) are used in float64 by the module.
        pos32 = [float(torch.tensor(p)) for p in pos]
        neg32 = [float(torch.tensor(n)) for n in neg]
        q, r = _reference_weights(pos32, neg32, gamma, mu, alpha)
        _close(w.pos, q, atol=1e-12)
        _close(w.neg, r, atol=1e-12)


def test_weight_ranges_and_monotonicity():
    # Invariant 4: q = 1 + alpha (1 - r); r strictly increasing in g, r(mu) = 0.5, ranges.
    g = torch.linspace(0.0, 2.0, 201, dtype=torch.float64)
    w = eqlv2_weights(g, torch.ones_like(g))
    r, q = w.neg[:-1], w.pos[:-1]
    _close(q, 1.0 + ALPHA * (1.0 - r), atol=1e-15)
    assert bool((r.diff() > 0).all())
    assert bool((r > 0).all()) and bool((r < 1).all())
    assert bool((q > 1).all()) and bool((q < 1 + ALPHA).all())
    at_mu = eqlv2_weights(torch.tensor([MU], dtype=torch.float64), torch.ones(1))
    _close(at_mu.neg[0], 0.5, atol=1e-9)  # 1e-10 in g's denominator moves it by ~3e-10


def test_background_weights_are_always_one():
    # Invariant 3: q_C = r_C = 1 whatever the statistics, which have no background entry.
    rng = random.Random(2)
    for _ in range(5):
        pos, neg = _random_stats(rng, 7)
        w = eqlv2_weights(torch.tensor(pos), torch.tensor(neg))
        assert w.pos.shape == (8,)
        assert w.pos[-1].item() == 1.0 and w.neg[-1].item() == 1.0
        # ... and the foreground weights are not (the check above is not vacuous).
        assert bool((w.pos[:-1] > 1.0).any())


def test_fresh_state_gives_unit_weights():
    w = eqlv2_weights(torch.zeros(5), torch.zeros(5))
    assert torch.equal(w.pos, torch.ones(6, dtype=torch.float64))
    assert torch.equal(w.neg, torch.ones(6, dtype=torch.float64))
    # One non-zero negative statistic is enough to leave the fresh state: every class without
    # positives now gets q ~ 5, r ~ 6.8e-5 (spec §2.3).
    w = eqlv2_weights(torch.zeros(5), torch.tensor([0.0, 0.0, 0.3, 0.0, 0.0]))
    _close(w.pos[:-1], [4.999729] * 5, atol=1e-6)
    _close(w.neg[:-1], [_sigmoid(-GAMMA * MU)] * 5, atol=1e-15)


def test_zero_statistics_are_finite():
    # P = 0 (unseen class): q ~ 5; Q = 0 with P > 0: g ~ 1e10, unit weights; huge Q: finite.
    w = eqlv2_weights(
        torch.tensor([0.0, 3.0, 1e-3, 1e12], dtype=torch.float64),
        torch.tensor([7.0, 0.0, 1e12, 1e12], dtype=torch.float64),
    )
    assert bool(torch.isfinite(w.pos).all()) and bool(torch.isfinite(w.neg).all())
    _close(w.pos, [4.999729, 1.0, 4.999729, 1.332691, 1.0], atol=1e-6)


def test_weights_carry_no_gradient():
    # Invariant 2, second half: no gradient reaches the statistics.
    pos = torch.tensor([0.5, 2.0], requires_grad=True)
    neg = torch.tensor([1.0, 1.0], requires_grad=True)
    w = eqlv2_weights(pos, neg)
    assert not w.pos.requires_grad and not w.neg.requires_grad
    z = torch.randn(4, 3, requires_grad=True)
    eqlv2_loss(z, torch.tensor([0, 1, 2, 2]), *w).backward()
    assert pos.grad is None and neg.grad is None
    assert z.grad is not None


# ---------------------------------------------------------------- worked examples (spec §6)

EX_A_Z1 = [[1, -1, -2, -1.5], [-1, 0.5, -0.5, -1], [-2, -1, 0, 0.5]]
EX_A_Z2 = [[0.5, -0.5, -1, -2], [-0.5, -1, 1, -1], [-1, -2, -1, 1]]


def test_example_a_two_steps():
    d = torch.float64
    pos_grad, neg_grad = torch.zeros(3, dtype=d), torch.zeros(3, dtype=d)

    # Step 1: fresh state, unit weights.
    w = eqlv2_weights(pos_grad, neg_grad)
    assert torch.equal(w.pos, torch.ones(4, dtype=d)) and torch.equal(w.neg, torch.ones(4, dtype=d))
    z1 = torch.tensor(EX_A_Z1, dtype=d, requires_grad=True)
    labels1 = torch.tensor([0, 1, 3])
    loss1 = eqlv2_loss(z1, labels1, w.pos, w.neg)
    _close(loss1.detach(), 1.378985, atol=1e-6)
    inc = eqlv2_grad_increments(z1, labels1, w.pos, w.neg)
    assert isinstance(inc, EQLv2GradIncrements)
    pos_grad += inc.pos
    neg_grad += inc.neg
    _close(pos_grad, [0.268941, 0.377541, 0.0], atol=1e-6)
    _close(neg_grad, [0.388144, 0.537883, 0.996744], atol=1e-6)
    _close(pos_grad / (neg_grad + 1e-10), [0.692890, 0.701901, 0.0], atol=1e-6)

    # Step 2: weights from the statistics of step 1 only.
    w = eqlv2_weights(pos_grad, neg_grad)
    _close(w.neg, [0.216647, 0.235559, 6.7724e-5, 1.0], atol=1e-6)
    _close(w.pos, [4.133414, 4.057765, 4.999729, 1.0], atol=1e-6)
    z2 = torch.tensor(EX_A_Z2, dtype=d, requires_grad=True)
    labels2 = torch.tensor([0, 2, 3])
    loss2 = eqlv2_loss(z2, labels2, w.pos, w.neg)
    _close(loss2.detach(), 1.555071, atol=1e-6)
    ones = torch.ones(4, dtype=d)
    _close(eqlv2_loss(z2.detach(), labels2, ones, ones), 1.289640, atol=1e-6)
    (grad,) = torch.autograd.grad(loss2, z2)
    _close(grad[0, 0], -0.520177, atol=1e-6)
    _close(grad[1, 2], -0.448211, atol=1e-6)
    inc = eqlv2_grad_increments(z2, labels2, w.pos, w.neg)
    pos_grad += inc.pos
    neg_grad += inc.neg
    _close(pos_grad, [1.829473, 0.377541, 1.344634], atol=1e-6)
    _close(neg_grad, [0.528202, 0.718247, 0.996780], atol=1e-6)
    _close(pos_grad / (neg_grad + 1e-10), [3.463584, 0.525642, 1.348978], atol=1e-6)

    # Step 3's weights.
    w = eqlv2_weights(pos_grad, neg_grad)
    _close(w.neg[:-1], [1.000000, 0.035836, 0.998625], atol=1e-6)
    _close(w.pos[:-1], [1.000000, 4.856654, 1.005501], atol=1e-6)


def test_example_b_test_scores():
    z = torch.tensor([[2, -1, 0.5, -2], [0, 0, 0, 3]], dtype=torch.float64)
    _close(
        eqlv2_probs(z),
        [[0.775803, 0.236883, 0.548260, 0.119203], [0.023713, 0.023713, 0.023713, 0.952574]],
        atol=1e-6,
    )


@pytest.mark.parametrize("label", [0, 700, 1203])
def test_example_c_initial_loss(label):
    num_fg = 1203
    prior_bias = -math.log((1 - 0.001) / 0.001)
    _close(prior_bias, -6.906755, atol=1e-6)
    ones = torch.ones(num_fg + 1, dtype=torch.float64)
    labels = torch.tensor([label])
    z = torch.full((1, num_fg + 1), prior_bias, dtype=torch.float64)
    _close(eqlv2_loss(z, labels, ones, ones), 8.111357, atol=1e-6)
    _close(eqlv2_loss(torch.zeros_like(z), labels, ones, ones), 834.549205, atol=1e-6)
    # float32, as in training: the same to float32 accuracy (torch's fused BCE is 1e-4 off).
    _close(eqlv2_loss(z.float(), labels, ones, ones), 8.111357, atol=5e-6)


# ---------------------------------------------------------------- loss


def test_fresh_state_loss_is_plain_bce_over_all_columns():
    # Invariant 1: unit weights, BCE over all C+1 columns (background task included) / R.
    rng = random.Random(3)
    z = [[rng.uniform(-6, 6) for _ in range(6)] for _ in range(9)]
    labels = [rng.randrange(6) for _ in range(9)]
    w = eqlv2_weights(torch.zeros(5), torch.zeros(5))
    loss = eqlv2_loss(torch.tensor(z, dtype=torch.float64), torch.tensor(labels), *w)
    expected = sum(_bce(x, y) for row, trow in zip(z, _dense(labels, 6)) for x, y in zip(row, trow))
    _close(loss, expected / 9, atol=1e-12)


@pytest.mark.parametrize("soft", [False, True])
def test_loss_matches_loop_reference(soft):
    rng = random.Random(4 + soft)
    num_fg, num_rois = 6, 11
    pos, neg = _random_stats(rng, num_fg)
    q, r = _reference_weights(pos, neg)
    w = eqlv2_weights(
        torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)
    )
    z = [[rng.uniform(-8, 8) for _ in range(num_fg + 1)] for _ in range(num_rois)]
    labels = [rng.randrange(num_fg + 1) for _ in range(num_rois - 2)] + [num_fg, 0]
    if soft:
        t = _random_soft_targets(rng, labels, num_fg + 1)
        targets = torch.tensor(t, dtype=torch.float64)
    else:
        t = _dense(labels, num_fg + 1)
        targets = torch.tensor(labels)
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        loss = eqlv2_loss(torch.tensor(z, dtype=dtype), targets, w.pos, w.neg)
        assert loss.dtype == dtype
        _close(loss, _reference_loss(z, t, q, r), atol=atol, rtol=1e-6)


def test_dense_one_hot_targets_equal_labels():
    torch.manual_seed(0)
    z = torch.randn(8, 5, dtype=torch.float64) * 3
    labels = torch.tensor([0, 1, 2, 3, 4, 4, 1, 0])
    w = eqlv2_weights(torch.rand(4), torch.rand(4) + 0.5)
    dense = F.one_hot(labels, 5).double()
    assert eqlv2_loss(z, labels, *w).item() == pytest.approx(
        eqlv2_loss(z, dense, *w).item(), abs=1e-14
    )
    for a, b in zip(eqlv2_grad_increments(z, labels, *w), eqlv2_grad_increments(z, dense, *w)):
        _close(a, b, atol=1e-14)


def test_loss_gradient_is_weighted_residual():
    # Invariant 2: dL/dz = W (sigmoid(z) - T) / R exactly.
    torch.manual_seed(1)
    num_fg, num_rois = 5, 7
    w = eqlv2_weights(torch.rand(num_fg) * 2, torch.rand(num_fg) + 0.1)
    z = (torch.randn(num_rois, num_fg + 1, dtype=torch.float64) * 4).requires_grad_()
    labels = torch.tensor([0, 1, 5, 5, 3, 4, 2])
    (grad,) = torch.autograd.grad(eqlv2_loss(z, labels, *w), z)
    t = F.one_hot(labels, num_fg + 1).double()
    weight = w.pos * t + w.neg * (1 - t)
    _close(grad, weight * (torch.sigmoid(z.detach()) - t) / num_rois, atol=1e-15)


def test_weights_are_applied_per_column_and_target():
    # A positive of class j is scaled by q_j, a negative by r_j: one RoI, one non-unit weight.
    z = torch.tensor([[0.3, -0.7, 0.2]], dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    base = [_bce(0.3, 1.0), _bce(-0.7, 0.0), _bce(0.2, 0.0)]
    pos_w = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)
    neg_w = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64)
    loss = eqlv2_loss(z, torch.tensor([0]), pos_w, neg_w)
    _close(loss, 2.0 * base[0] + 0.25 * base[1] + base[2], atol=1e-14)
    _close(eqlv2_loss(z, torch.tensor([0]), ones, ones), sum(base), atol=1e-14)


# ---------------------------------------------------------------- gradient statistics


def _weighted_bce_sum(z, t, pos_w, neg_w):
    """sum W BCE(z, T) written out independently of the module (softplus form)."""
    weight = neg_w + (pos_w - neg_w) * t
    return (weight * (F.softplus(z) - t * z)).sum()


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_increments_match_autograd(soft, dtype):
    """The closed-form statistics equal |dL/dz| of the weighted BCE, split by target (§2.3)."""
    rng = random.Random(10 + soft)
    torch.manual_seed(10 + soft)
    num_fg, num_rois = 9, 40
    pos, neg = _random_stats(rng, num_fg)
    w = eqlv2_weights(torch.tensor(pos), torch.tensor(neg))
    assert bool((w.pos[:-1] != 1).any()) and bool((w.neg[:-1] != 1).any())
    labels = torch.randint(0, num_fg + 1, (num_rois,))
    labels[:3] = num_fg  # some background RoIs for sure
    if soft:
        targets = torch.tensor(_random_soft_targets(rng, labels.tolist(), num_fg + 1), dtype=dtype)
        t = targets
    else:
        targets = labels
        t = F.one_hot(labels, num_fg + 1).to(dtype)
    z = (torch.randn(num_rois, num_fg + 1, dtype=dtype) * 3).requires_grad_()
    (grad,) = torch.autograd.grad(_weighted_bce_sum(z, t, w.pos.to(dtype), w.neg.to(dtype)), z)
    expected_pos = (grad.abs() * t).sum(0)[:-1]
    expected_neg = (grad.abs() * (1 - t)).sum(0)[:-1]
    inc = eqlv2_grad_increments(z, targets, w.pos, w.neg)
    assert inc.pos.shape == (num_fg,) and inc.neg.shape == (num_fg,)
    assert inc.pos.dtype == dtype and not inc.pos.requires_grad and not inc.neg.requires_grad
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    _close(inc.pos, expected_pos, atol=tol, rtol=tol)
    _close(inc.neg, expected_neg, atol=tol, rtol=tol)
    # The module's own loss has the same gradient direction, times 1/R.
    (grad_loss,) = torch.autograd.grad(eqlv2_loss(z, targets, w.pos, w.neg), z)
    _close((grad_loss.abs() * num_rois * t).sum(0)[:-1], inc.pos, atol=tol, rtol=tol)


@pytest.mark.parametrize("soft", [False, True])
def test_grad_increments_match_loop_reference(soft):
    rng = random.Random(20 + soft)
    num_fg, num_rois = 5, 13
    pos, neg = _random_stats(rng, num_fg)
    q, r = _reference_weights(pos, neg)
    w = eqlv2_weights(
        torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)
    )
    z = [[rng.uniform(-6, 6) for _ in range(num_fg + 1)] for _ in range(num_rois)]
    labels = [rng.randrange(num_fg + 1) for _ in range(num_rois)]
    if soft:
        t = _random_soft_targets(rng, labels, num_fg + 1)
        targets = torch.tensor(t, dtype=torch.float64)
    else:
        t = _dense(labels, num_fg + 1)
        targets = torch.tensor(labels)
    inc = eqlv2_grad_increments(torch.tensor(z, dtype=torch.float64), targets, w.pos, w.neg)
    exp_pos, exp_neg = _reference_increments(z, t, q, r)
    _close(inc.pos, exp_pos, atol=1e-12)
    _close(inc.neg, exp_neg, atol=1e-12)


def test_increments_only_touch_present_classes():
    # Invariant 6: non-negative; P_j changes only if some RoI has label j; bg RoIs are
    # negatives of every class; a bg-only batch changes only Q.
    torch.manual_seed(2)
    num_fg = 6
    w = eqlv2_weights(torch.rand(num_fg), torch.rand(num_fg) + 0.1)
    z = torch.randn(5, num_fg + 1) * 3
    inc = eqlv2_grad_increments(z, torch.tensor([1, 1, 4, 6, 6]), *w)
    assert bool((inc.pos >= 0).all()) and bool((inc.neg > 0).all())
    assert bool((inc.pos[[1, 4]] > 0).all())
    assert bool((inc.pos[[0, 2, 3, 5]] == 0).all())
    bg_only = eqlv2_grad_increments(z, torch.full((5,), num_fg), *w)
    assert bool((bg_only.pos == 0).all()) and bool((bg_only.neg > 0).all())
    # Background RoIs count as negatives of class j: G W (1 - T) summed over them.
    expected = (torch.sigmoid(z[:, :-1]) * w.neg[:-1].float()).sum(0)
    _close(bg_only.neg, expected, atol=1e-6)


def test_two_ranks_sum_to_the_concatenated_batch():
    # Invariant 7: per-rank increments with the same pre-step weights add up exactly.
    torch.manual_seed(3)
    num_fg = 8
    w = eqlv2_weights(
        torch.rand(num_fg, dtype=torch.float64), torch.rand(num_fg, dtype=torch.float64)
    )
    z_a, z_b = torch.randn(6, num_fg + 1, dtype=torch.float64), torch.randn(
        9, num_fg + 1, dtype=torch.float64
    )
    y_a, y_b = torch.randint(0, num_fg + 1, (6,)), torch.randint(0, num_fg + 1, (9,))
    a = eqlv2_grad_increments(z_a, y_a, *w)
    b = eqlv2_grad_increments(z_b, y_b, *w)
    both = eqlv2_grad_increments(torch.cat([z_a, z_b]), torch.cat([y_a, y_b]), *w)
    _close(a.pos + b.pos, both.pos, atol=1e-14)
    _close(a.neg + b.neg, both.neg, atol=1e-14)
    # A rank with no RoIs contributes zeros of the right shape.
    empty = eqlv2_grad_increments(torch.zeros(0, num_fg + 1, dtype=torch.float64), y_a[:0], *w)
    assert torch.equal(torch.stack(empty), torch.zeros(2, num_fg, dtype=torch.float64))


def test_saturated_positive_keeps_its_gradient():
    # sigmoid(40) - 1 rounds to 0 in float32; the complementary form keeps sigmoid(-40) = 4e-18.
    ones = torch.ones(3)
    inc = eqlv2_grad_increments(torch.tensor([[40.0, -40.0, -40.0]]), torch.tensor([0]), ones, ones)
    _close(inc.pos, [math.exp(-40.0), 0.0], atol=0.0, rtol=1e-5)
    _close(inc.neg, [0.0, math.exp(-40.0)], atol=0.0, rtol=1e-5)


def _train(steps, pos_grad, neg_grad, seed):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        z = torch.randn(6, 5, generator=gen)
        labels = torch.randint(0, 5, (6,), generator=gen)
        w = eqlv2_weights(pos_grad, neg_grad)
        losses.append(eqlv2_loss(z, labels, *w))
        inc = eqlv2_grad_increments(z, labels, *w)
        pos_grad += inc.pos.double()
        neg_grad += inc.neg.double()
    return losses


def test_statistics_round_trip_reproduces_the_next_loss():
    # Invariants 5 and 8: the weights are a function of the saved statistics only, so saving
    # them after k steps and loading them reproduces step k+1 bit for bit.
    pos_grad, neg_grad = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    _train(3, pos_grad, neg_grad, seed=0)
    buf = io.BytesIO()
    torch.save({"pos": pos_grad, "neg": neg_grad}, buf)
    buf.seek(0)
    state = torch.load(buf)
    gen_z = torch.randn(6, 5, generator=torch.Generator().manual_seed(99))
    labels = torch.tensor([0, 1, 2, 3, 4, 4])
    before = (pos_grad.clone(), neg_grad.clone())
    loss_a = eqlv2_loss(gen_z, labels, *eqlv2_weights(pos_grad, neg_grad))
    loss_b = eqlv2_loss(gen_z, labels, *eqlv2_weights(state["pos"], state["neg"]))
    assert torch.equal(loss_a, loss_b)
    # The functions never modify the statistics they are given.
    assert torch.equal(pos_grad, before[0]) and torch.equal(neg_grad, before[1])
    # The statistics did move the weights (the equality above is not of unit weights).
    assert bool((eqlv2_weights(pos_grad, neg_grad).pos != 1).any())


# ---------------------------------------------------------------- inference scores


def test_probs_columns():
    # Invariant 9: shape, columns c < C = sigmoid(z_c)(1 - sigmoid(z_C)), last = sigmoid(z_C).
    rng = random.Random(5)
    z = [[rng.uniform(-8, 8) for _ in range(7)] for _ in range(4)]
    probs = eqlv2_probs(torch.tensor(z, dtype=torch.float64))
    assert probs.shape == (4, 7)
    expected = [
        [_sigmoid(x) * (1 - _sigmoid(row[-1])) for x in row[:-1]] + [_sigmoid(row[-1])] for row in z
    ]
    _close(probs, expected, atol=1e-14)
    raw = eqlv2_probs(torch.tensor(z, dtype=torch.float64), test_with_obj=False)
    _close(raw, [[_sigmoid(x) for x in row] for row in z], atol=1e-14)


def test_probs_keep_confident_foreground():
    # 1 - sigmoid(20) is 0 in float32; sigmoid(-20) = 2.06e-9 keeps the class scores ranked.
    z = torch.tensor([[0.0, 2.0, 20.0]])
    probs = eqlv2_probs(z)
    _close(
        probs[0, :2], [0.5 * _sigmoid(-20.0), _sigmoid(2.0) * _sigmoid(-20.0)], atol=0, rtol=1e-5
    )


# ---------------------------------------------------------------- edge cases


def test_empty_batch():
    # Invariant 10: loss 0 with a grad_fn, zero gradient, zero increments.
    w = eqlv2_weights(torch.rand(3), torch.rand(3))
    z = torch.zeros(0, 4, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    loss = eqlv2_loss(z, labels, *w)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert z.grad.shape == (0, 4)
    inc = eqlv2_grad_increments(z, labels, *w)
    assert torch.equal(inc.pos, torch.zeros(3)) and torch.equal(inc.neg, torch.zeros(3))
    assert eqlv2_probs(z.detach()).shape == (0, 4)
    # Dense empty targets too.
    assert eqlv2_loss(z, torch.zeros(0, 4), *w).item() == 0.0


def test_all_background_batch_is_finite_and_backprops():
    torch.manual_seed(4)
    w = eqlv2_weights(torch.tensor([0.0, 1.0, 5.0]), torch.tensor([2.0, 1.0, 0.0]))
    z = (torch.randn(16, 4) * 10).requires_grad_()
    labels = torch.full((16,), 3)
    loss = eqlv2_loss(z, labels, *w)
    assert torch.isfinite(loss)
    loss.backward()
    assert bool(torch.isfinite(z.grad).all()) and bool((z.grad != 0).all())
    # Only the background column is a positive: its gradient is negative, all others positive.
    assert bool((z.grad[:, -1] < 0).all()) and bool((z.grad[:, :-1] > 0).all())


def test_extreme_logits_are_finite():
    w = eqlv2_weights(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 1.0]))
    z = torch.tensor([[1e4, -1e4, 1e4], [-1e4, 1e4, -1e4]], requires_grad=True)
    loss = eqlv2_loss(z, torch.tensor([1, 2]), *w)
    assert torch.isfinite(loss)
    loss.backward()
    assert bool(torch.isfinite(z.grad).all())
    inc = eqlv2_grad_increments(z, torch.tensor([1, 2]), *w)
    assert bool(torch.isfinite(torch.stack(inc)).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_compute_in_float32(dtype):
    torch.manual_seed(5)
    num_fg = 300
    w = eqlv2_weights(torch.rand(num_fg) * 2, torch.rand(num_fg) + 0.1)
    z = (torch.randn(32, num_fg + 1) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, num_fg + 1, (32,))
    z64 = z.detach().double()
    loss = eqlv2_loss(z, labels, *w)
    assert loss.dtype == torch.float32
    _close(loss, eqlv2_loss(z64, labels, *w), atol=0, rtol=1e-6)
    loss.backward()
    assert z.grad.dtype == dtype and bool(torch.isfinite(z.grad.float()).all())
    inc = eqlv2_grad_increments(z, labels, *w)
    assert inc.pos.dtype == torch.float32
    inc64 = eqlv2_grad_increments(z64, labels, *w)
    _close(torch.stack(inc), torch.stack(inc64), atol=1e-6, rtol=1e-5)
    probs = eqlv2_probs(z.detach())
    assert probs.dtype == torch.float32
    _close(probs, eqlv2_probs(z64), atol=1e-7, rtol=1e-6)


def test_float32_statistics_match_float64():
    pos, neg = torch.tensor([0.3, 1.2, 0.0]), torch.tensor([0.5, 1.0, 2.0])
    a = eqlv2_weights(pos, neg)
    b = eqlv2_weights(pos.double(), neg.double())
    assert a.pos.dtype == torch.float64
    assert torch.equal(a.pos, b.pos) and torch.equal(a.neg, b.neg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_with_cpu_weights():
    w = eqlv2_weights(torch.tensor([0.5, 1.5]), torch.tensor([1.0, 1.0]))
    z = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 0])
    loss = eqlv2_loss(z.cuda(), labels.cuda(), *w)
    assert loss.device.type == "cuda"
    _close(loss.cpu(), eqlv2_loss(z, labels, *w), atol=1e-12)
    inc = eqlv2_grad_increments(z.cuda(), labels.cuda(), *w)
    assert inc.pos.device.type == "cuda"
    _close(torch.stack(inc).cpu(), torch.stack(eqlv2_grad_increments(z, labels, *w)), atol=1e-12)
    w_cuda = eqlv2_weights(torch.tensor([0.5, 1.5]).cuda(), torch.tensor([1.0, 1.0]).cuda())
    assert w_cuda.pos.device.type == "cuda"
    _close(w_cuda.pos.cpu(), w.pos, atol=1e-15)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "pos, neg, kwargs, match",
    [
        (torch.zeros(3), torch.zeros(4), {}, "same shape"),
        (torch.zeros(0), torch.zeros(0), {}, "non-empty"),
        (torch.zeros(2, 2), torch.zeros(2, 2), {}, "1-D"),
        ([0.0, 1.0], [1.0, 1.0], {}, "tensors"),
        (torch.tensor([-1.0, 0.0]), torch.ones(2), {}, "finite and >= 0"),
        (torch.tensor([float("nan"), 0.0]), torch.ones(2), {}, "finite and >= 0"),
        (torch.ones(2), torch.tensor([1.0, float("inf")]), {}, "finite and >= 0"),
        (torch.ones(2), torch.ones(2), {"alpha": -1.0}, "alpha"),
        (torch.ones(2), torch.ones(2), {"gamma": float("inf")}, "gamma"),
        (torch.ones(2), torch.ones(2), {"mu": float("nan")}, "mu"),
    ],
)
def test_bad_statistics_raise(pos, neg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eqlv2_weights(pos, neg, **kwargs)


def _ones(n):
    return torch.ones(n, dtype=torch.float64)


@pytest.mark.parametrize(
    "logits, targets, pos_w, neg_w, match",
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), _ones(4), _ones(4), r"\(R, C\+1\)"),
        (torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), _ones(1), _ones(1), "C >= 1"),
        (
            torch.zeros(2, 4, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
            _ones(4),
            _ones(4),
            "float",
        ),
        (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), _ones(3), _ones(4), "pos_w"),
        (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), _ones(4), _ones(5), "neg_w"),
        (torch.zeros(2, 4), torch.tensor([0, 4]), _ones(4), _ones(4), r"\[0, 3\]"),
        (torch.zeros(2, 4), torch.tensor([-1, 0]), _ones(4), _ones(4), r"\[0, 3\]"),
        (torch.zeros(2, 4), torch.tensor([0, 1, 2]), _ones(4), _ones(4), "labels"),
        (torch.zeros(2, 4), torch.tensor([True, False]), _ones(4), _ones(4), "labels"),
        (torch.zeros(2, 4), torch.zeros(2, 3), _ones(4), _ones(4), "dense targets"),
        (torch.zeros(2, 4), torch.full((2, 4), 1.5), _ones(4), _ones(4), r"\[0, 1\]"),
        (torch.zeros(2, 4), torch.full((2, 4), float("nan")), _ones(4), _ones(4), r"\[0, 1\]"),
        (torch.zeros(2, 4), [0, 1], _ones(4), _ones(4), "tensor"),
    ],
)
def test_bad_loss_inputs_raise(logits, targets, pos_w, neg_w, match):
    with pytest.raises(ValueError, match=match):
        eqlv2_loss(logits, targets, pos_w, neg_w)
    with pytest.raises(ValueError, match=match):
        eqlv2_grad_increments(logits, targets, pos_w, neg_w)


@pytest.mark.parametrize(
    "logits", [torch.zeros(3), torch.zeros(2, 1), torch.zeros(2, 3, dtype=torch.long)]
)
def test_bad_probs_inputs_raise(logits):
    with pytest.raises(ValueError, match="EQL v2 logits"):
        eqlv2_probs(logits)
