"""Tests of longtail/functional/seesaw.py: class counts, seesaw factors, loss and scores.

Expected numbers are either pinned from the worked examples of the Seesaw spec (§6) or computed
here independently (plain Python ``math`` loops in float64 following the spec's formulas, paper
eq. 4 with the code's clamps); none are produced by the module under test.
"""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from longtail.functional.seesaw import (
    SeesawLosses,
    seesaw_class_probs,
    seesaw_count_increments,
    seesaw_log_factors,
    seesaw_loss,
    seesaw_probs,
)

P, Q, EPS = 0.8, 2.0, 1e-2


def _close(actual, expected, atol, rtol=0.0):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def _reference_factors(z_cls, label, counts, p=P, q=Q, eps=EPS):
    """S_ij for one fg RoI of class i = label, spec §2.2-2.3 with Python floats."""
    num_classes = len(z_cls)
    n = [max(float(c), 1.0) for c in counts[:num_classes]]
    sigma = _softmax(z_cls)
    s = []
    for j in range(num_classes):
        if j == label:
            s.append(1.0)
            continue
        m = (n[j] / n[label]) ** p if n[j] < n[label] else 1.0
        ratio = sigma[j] / max(sigma[label], eps)
        c = ratio**q if ratio > 1 else 1.0
        s.append(m * c)
    return s


def _reference_losses(z, labels, counts, p=P, q=Q, eps=EPS, class_targets=None):
    """(classes, objectness) with Python floats: eq. 4 per fg RoI, 2-way CE per RoI, / R."""
    num_classes = len(z[0]) - 2
    cls_total, obj_total = 0.0, 0.0
    for r, (row, label) in enumerate(zip(z, labels)):
        obj = _softmax(row[num_classes:])
        obj_total -= math.log(obj[1] if label == num_classes else obj[0])
        if label == num_classes:
            continue
        s = _reference_factors(row[:num_classes], label, counts, p, q, eps)
        m = max(row[:num_classes])
        terms = [s_j * math.exp(z_j - m) for s_j, z_j in zip(s, row[:num_classes])]
        log_d = math.log(sum(terms))
        if class_targets is None:
            cls_total += log_d - (row[label] - m)
        else:
            # -sum_j t_j log(S_j e^{z_j} / D), with S_ii = 1.
            for j, t_j in enumerate(class_targets[r]):
                cls_total -= t_j * (math.log(s[j]) + row[j] - m - log_d)
    return cls_total / len(z), obj_total / len(z)


def _reference_grad(z, labels, counts):
    """Spec §2.4 gradient of classes + objectness, / R, with Python floats."""
    num_classes = len(z[0]) - 2
    out = []
    for row, label in zip(z, labels):
        g = [0.0] * len(row)
        obj = _softmax(row[num_classes:])
        target = 1 if label == num_classes else 0
        for k in range(2):
            g[num_classes + k] = obj[k] - (1.0 if k == target else 0.0)
        if label < num_classes:
            s = _reference_factors(row[:num_classes], label, counts)
            m = max(row[:num_classes])
            terms = [s_j * math.exp(z_j - m) for s_j, z_j in zip(s, row[:num_classes])]
            d = sum(terms)
            for j in range(num_classes):
                g[j] = terms[j] / d - (1.0 if j == label else 0.0)
        out.append([x / len(z) for x in g])
    return out


def _with_objectness(z_cls, obj=(0.0, 0.0)):
    return [list(row) + list(obj) for row in z_cls]


def _random_case(rng, num_classes, num_rois, scale=4.0):
    z = [[rng.uniform(-scale, scale) for _ in range(num_classes + 2)] for _ in range(num_rois)]
    labels = [rng.randrange(num_classes + 1) for _ in range(num_rois)]
    labels[0], labels[-1] = 0, num_classes  # at least one fg and one bg RoI
    counts = [rng.choice([0, 1, 3, 40, 1000, 250000]) for _ in range(num_classes)] + [10**6]
    for label in labels:  # counts include the batch, as after seesaw_count_increments
        counts[label] += 1
    return z, labels, counts


# ---------------------------------------------------------------- worked examples (spec §6)


def _one_roi(z_cls, label, counts, **kwargs):
    z = torch.tensor(_with_objectness([z_cls]), dtype=torch.float64)
    labels = torch.tensor([label])
    counts = torch.tensor(list(counts) + [0.0], dtype=torch.float64)
    s = seesaw_log_factors(z, labels, counts, **kwargs).exp()[0]
    return s, seesaw_loss(z, labels, counts, **kwargs).classes


def test_example_1_mitigation_only():
    s, loss = _one_roi([1, 2, 0.5], 0, [100, 10, 1], q=0.0)
    _close(s, [1, 0.158489, 0.025119], atol=1e-6)
    _close(
        torch.log(s) + torch.tensor([1, 2, 0.5], dtype=torch.float64),
        [1, 0.157932, -3.184136],
        atol=1e-6,
    )
    _close(loss, 0.368838, atol=1e-6)
    _, plain = _one_roi([1, 2, 0.5], 0, [100, 10, 1], p=0.0, q=0.0)
    _close(plain, 1.464369, atol=1e-6)


def test_example_2_compensation():
    counts = [100, 10, 1]
    z_cls = [3, 1, 0]
    _close(
        seesaw_class_probs(torch.tensor([z_cls + [0, 0]], dtype=torch.float64)),
        [[0.843795, 0.114195, 0.042010]],
        atol=1e-6,
    )
    s, loss = _one_roi(z_cls, 2, counts)
    _close(s, [403.428793, 7.389056, 1.0], atol=1e-6)
    _close(s, [math.exp(6), math.exp(2), 1.0], atol=1e-9)
    _close(loss, 9.002599, atol=1e-6)
    _, plain = _one_roi(z_cls, 2, counts, p=0.0, q=0.0)
    _close(plain, 3.169846, atol=1e-6)
    s, loss = _one_roi(z_cls, 1, counts)
    _close(s, [54.598150, 1.0, 0.158489], atol=1e-6)
    _close(loss, 6.002620, atol=1e-6)
    _, plain = _one_roi(z_cls, 1, counts, p=0.0, q=0.0)
    _close(plain, 2.169846, atol=1e-6)


def test_example_3_eps_clamp():
    z_cls = [0, 0, -6]
    _close(
        seesaw_class_probs(torch.tensor([z_cls + [0, 0]], dtype=torch.float64)),
        [[0.499381, 0.499381, 0.001238]],
        atol=1e-6,
    )
    s, _ = _one_roi(z_cls, 2, [7, 7, 7])
    _close(s, [2493.815, 2493.815, 1.0], atol=1e-3)
    # eps = 0 is the paper's eq. 8: (sigma_j / sigma_i)^q = exp(q (z_j - z_i)) = e^12.
    s, _ = _one_roi(z_cls, 2, [7, 7, 7], eps=0.0)
    _close(s, [162754.8, 162754.8, 1.0], atol=0.1)
    _close(s, [math.exp(12), math.exp(12), 1.0], atol=0, rtol=1e-12)


EX4_LOGITS = [[2, 0.5, -1, 1, -1], [0.5, 1.5, 0, 0.5, 0], [0, 0, 0, -1, 2]]
EX4_LABELS = [0, 2, 3]


def test_example_4_full_loss():
    d = torch.float64
    counts = torch.tensor([50, 5, 0, 200], dtype=d)
    labels = torch.tensor(EX4_LABELS)
    inc = seesaw_count_increments(labels, 3)
    assert inc.dtype == torch.int64 and inc.tolist() == [1, 0, 1, 1]
    counts = counts + inc
    _close(counts, [51, 5, 1, 201], atol=0)
    z = torch.tensor(EX4_LOGITS, dtype=d, requires_grad=True)
    s = seesaw_log_factors(z, labels, counts).exp()
    _close(s[0], [1, 0.155998, 0.043047], atol=1e-6)
    _close(s[1], [2.718282, 20.085537, 1], atol=1e-6)
    _close(s[2], [1, 1, 1], atol=0)  # background row: no adjustment
    losses = seesaw_loss(z, labels, counts)
    assert isinstance(losses, SeesawLosses)
    _close(losses.classes.detach(), 1.531800, atol=1e-6)
    _close(losses.objectness.detach(), 0.216531, atol=1e-6)
    total = losses.classes + losses.objectness
    _close(total.detach(), 1.748330, atol=1e-6)
    (grad,) = torch.autograd.grad(total, z)
    _close(grad[2], [0, 0, 0, 0.015809, -0.015809], atol=1e-6)
    assert bool((grad[2, :3] == 0).all())
    _close(
        seesaw_probs(z.detach()),
        [
            [0.691952, 0.154395, 0.034450, 0.119203],
            [0.143927, 0.391235, 0.087296, 0.377541],
            [0.015809, 0.015809, 0.015809, 0.952574],
        ],
        atol=1e-6,
    )
    # A second call with the same batch adds its histogram again.
    counts = counts + seesaw_count_increments(labels, 3)
    _close(counts, [52, 5, 2, 202], atol=0)
    _close(seesaw_loss(z.detach(), labels, counts).classes, 1.532119, atol=1e-6)


# ---------------------------------------------------------------- factors (invariants 1-3)


def test_no_factors_is_plain_ce_over_fg_divided_by_all():
    # Invariant 1: p = q = 0, or equal counts with q = 0, gives plain CE over fg RoIs / R.
    rng = random.Random(0)
    z, labels, counts = _random_case(rng, 6, 12)
    zt, lt = torch.tensor(z, dtype=torch.float64), torch.tensor(labels)
    fg = lt < 6
    plain = F.cross_entropy(zt[fg, :6], lt[fg], reduction="sum") / 12
    _close(seesaw_loss(zt, lt, torch.tensor(counts), p=0.0, q=0.0).classes, plain, atol=1e-12)
    equal = torch.full((7,), 17.0)
    _close(seesaw_loss(zt, lt, equal, q=0.0).classes, plain, atol=1e-12)
    # ... and the default factors change it (the comparison above is not vacuous).
    assert abs(seesaw_loss(zt, lt, torch.tensor(counts)).classes.item() - plain.item()) > 1e-3


def test_mitigation_at_most_one_compensation_at_least_one():
    # Invariant 2, on random inputs; M and C are isolated with q = 0 and p = 0.
    rng = random.Random(1)
    z, labels, counts = _random_case(rng, 8, 30)
    zt, lt, ct = torch.tensor(z, dtype=torch.float64), torch.tensor(labels), torch.tensor(counts)
    fg = lt < 8
    n = ct[:8].double().clamp(min=1)
    log_m = seesaw_log_factors(zt, lt, ct, q=0.0)[fg]
    rows = n[lt[fg]].unsqueeze(1)
    assert bool((log_m <= 0).all())
    assert bool((log_m[n.unsqueeze(0).expand_as(log_m) >= rows] == 0).all())
    assert bool((log_m < 0).any())
    log_c = seesaw_log_factors(zt, lt, ct, p=0.0)[fg]
    sigma = torch.softmax(zt[fg, :8], dim=1)
    floor = sigma.gather(1, lt[fg].unsqueeze(1)).clamp(min=EPS)
    assert bool((log_c >= 0).all())
    assert bool((log_c[sigma <= floor] == 0).all())
    assert bool((log_c > 0).any())
    # The target logit is never modified.
    both = seesaw_log_factors(zt, lt, ct)[fg]
    assert bool((both.gather(1, lt[fg].unsqueeze(1)) == 0).all())
    # The factors multiply: log S = log M + log C.
    _close(both, log_m + log_c, atol=1e-12)


def test_factors_match_loop_reference():
    rng = random.Random(2)
    z, labels, counts = _random_case(rng, 7, 25, scale=6.0)
    log_s = seesaw_log_factors(
        torch.tensor(z, dtype=torch.float64), torch.tensor(labels), torch.tensor(counts)
    )
    for r, (row, label) in enumerate(zip(z, labels)):
        if label == 7:
            assert bool((log_s[r] == 0).all())
        else:
            _close(
                log_s[r].exp(), _reference_factors(row[:7], label, counts), atol=1e-10, rtol=1e-10
            )


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_loss_and_gradient_match_loop_reference(dtype, atol):
    # Invariant 3: eq. 4 per fg RoI, the 2.4 gradient, S without gradient.
    rng = random.Random(3)
    z, labels, counts = _random_case(rng, 9, 40)
    zt = torch.tensor(z, dtype=dtype, requires_grad=True)
    losses = seesaw_loss(zt, torch.tensor(labels), torch.tensor(counts))
    assert losses.classes.dtype == dtype
    exp_cls, exp_obj = _reference_losses(z, labels, counts)
    _close(losses.classes.detach(), exp_cls, atol=atol, rtol=1e-6)
    _close(losses.objectness.detach(), exp_obj, atol=atol, rtol=1e-6)
    (grad,) = torch.autograd.grad(losses.classes + losses.objectness, zt)
    _close(grad, _reference_grad(z, labels, counts), atol=atol)


def test_compensation_reads_raw_class_logits_only():
    # The objectness logits do not enter the factors; the class logits do.
    z = torch.tensor([[3.0, 1.0, 0.0, 5.0, -5.0]], dtype=torch.float64)
    labels, counts = torch.tensor([2]), torch.tensor([100.0, 10.0, 1.0, 0.0])
    base = seesaw_log_factors(z, labels, counts)
    z_obj = z.clone()
    z_obj[0, 3:] = torch.tensor([-5.0, 5.0])
    assert torch.equal(seesaw_log_factors(z_obj, labels, counts), base)
    z_cls = z.clone()
    z_cls[0, 0] = 4.0
    assert not torch.equal(seesaw_log_factors(z_cls, labels, counts), base)


# ---------------------------------------------------------------- counts (invariants 4, 9)


def test_count_increments_histogram():
    labels = torch.tensor([2, 0, 2, 5, 5, 5])
    inc = seesaw_count_increments(labels, 5)
    assert inc.shape == (6,) and inc.dtype == torch.int64
    assert inc.tolist() == [1, 0, 2, 0, 0, 3]
    assert seesaw_count_increments(torch.zeros(0, dtype=torch.long), 5).tolist() == [0] * 6


def test_first_call_sees_its_own_roi():
    # Invariant 4: counts are updated before the loss, so a first call with one RoI of class k
    # already has N_k = 1; a never-seen class stays at N' = 1 (the clamp), nothing is mitigated.
    counts = torch.zeros(4, dtype=torch.float64)
    labels = torch.tensor([1])
    counts += seesaw_count_increments(labels, 3)
    assert counts.tolist() == [0, 1, 0, 0]
    z = torch.tensor([[0.2, -0.3, 0.4, 0.0, 0.0]], dtype=torch.float64)
    assert bool((seesaw_log_factors(z, labels, counts, q=0.0) == 0).all())
    # Counts never decrease: the increment is non-negative and a repeat call adds again.
    again = counts + seesaw_count_increments(labels, 3)
    assert again.tolist() == [0, 2, 0, 0]


def test_two_ranks_histograms_sum_to_the_concatenated_batch():
    # Invariant 9 (the sync is the caller's all_reduce of these histograms).
    gen = torch.Generator().manual_seed(4)
    a = torch.randint(0, 11, (37,), generator=gen)
    b = torch.randint(0, 11, (12,), generator=gen)
    total = seesaw_count_increments(a, 10) + seesaw_count_increments(b, 10)
    assert torch.equal(total, seesaw_count_increments(torch.cat([a, b]), 10))
    assert int(total.sum()) == 49


def test_int64_and_float64_counts_agree():
    rng = random.Random(5)
    z, labels, counts = _random_case(rng, 5, 10)
    zt, lt = torch.tensor(z), torch.tensor(labels)
    a = seesaw_loss(zt, lt, torch.tensor(counts, dtype=torch.int64))
    b = seesaw_loss(zt, lt, torch.tensor(counts, dtype=torch.float64))
    assert torch.equal(a.classes, b.classes) and torch.equal(a.objectness, b.objectness)


def test_large_counts_are_used_exactly():
    # 2^24 + 1 is not a float32 (it rounds to 2^24 = big - 1, which would give M = 1); float64
    # keeps the two counts apart.
    big = 2**24 + 1
    counts = torch.tensor([big, big - 1, 0], dtype=torch.int64)
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    log_s = seesaw_log_factors(z, torch.tensor([0]), counts, q=0.0)
    _close(log_s[0, 1], P * math.log((big - 1) / big), atol=0, rtol=1e-6)


# ---------------------------------------------------------------- objectness (invariant 6)


def test_objectness_targets():
    # fg RoIs are pushed to column C (object), bg RoIs to column C+1 (background).
    z = torch.zeros(2, 5, requires_grad=True)
    losses = seesaw_loss(z, torch.tensor([1, 3]), torch.tensor([1, 1, 1, 1]))
    (grad,) = torch.autograd.grad(losses.objectness, z)
    _close(grad, [[0, 0, 0, -0.25, 0.25], [0, 0, 0, 0.25, -0.25]], atol=1e-7)
    _close(losses.objectness, math.log(2), atol=1e-7)


# ---------------------------------------------------------------- normalisation and edge cases


def test_class_term_is_divided_by_all_rois():
    z = torch.tensor([[1.0, -1.0, 0.5, 0.0, 0.0]], dtype=torch.float64)
    counts = torch.tensor([3, 5, 1, 100])
    one = seesaw_loss(z, torch.tensor([0]), counts).classes
    bg_rows = torch.tensor([[0.3, 0.2, -0.1, -1.0, 1.0]] * 3, dtype=torch.float64)
    four = seesaw_loss(torch.cat([z, bg_rows]), torch.tensor([0, 3, 3, 3]), counts).classes
    _close(four, one / 4, atol=1e-15)


def test_zero_fg_batch():
    # Invariant 8: class term 0 with a grad_fn, objectness > 0, class logits get zero gradient.
    z = (torch.randn(6, 5) * 3).requires_grad_()
    losses = seesaw_loss(z, torch.full((6,), 3), torch.tensor([0, 0, 0, 6]))
    assert losses.classes.item() == 0.0 and losses.classes.grad_fn is not None
    assert losses.objectness.item() > 0
    (losses.classes + losses.objectness).backward()
    assert bool(torch.isfinite(z.grad).all())
    assert bool((z.grad[:, :3] == 0).all()) and bool((z.grad[:, 3:] != 0).all())


def test_empty_batch():
    z = torch.zeros(0, 5, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    losses = seesaw_loss(z, labels, torch.zeros(4))
    for term in losses:
        assert term.item() == 0.0 and term.grad_fn is not None
    (losses.classes + losses.objectness).backward()
    assert z.grad.shape == (0, 5)
    assert seesaw_log_factors(z, labels, torch.zeros(4)).shape == (0, 3)
    assert seesaw_probs(z.detach()).shape == (0, 4)
    assert seesaw_class_probs(z.detach()).shape == (0, 3)


def test_zero_count_classes_are_finite():
    # All counts zero, even for labels in the batch (the clamp to 1 keeps everything finite).
    rng = random.Random(6)
    z, labels, _ = _random_case(rng, 6, 20)
    zt = torch.tensor(z, requires_grad=True)
    losses = seesaw_loss(zt, torch.tensor(labels), torch.zeros(7))
    assert all(bool(torch.isfinite(t)) for t in losses)
    (losses.classes + losses.objectness).backward()
    assert bool(torch.isfinite(zt.grad).all())
    # Zero counts are treated as 1: maximal mitigation by a frequent class, no NaN.
    z1 = torch.zeros(1, 4, dtype=torch.float64)
    log_s = seesaw_log_factors(z1, torch.tensor([0]), torch.tensor([1000, 0, 0]), q=0.0)
    _close(log_s[0], [0.0, P * math.log(1 / 1000)], atol=1e-12)


def test_extreme_logits_are_finite():
    z = torch.tensor([[1e3, -1e3, 0.0, 1e3, -1e3], [-1e3, 1e3, 0.0, -1e3, 1e3]], requires_grad=True)
    losses = seesaw_loss(z, torch.tensor([1, 2]), torch.tensor([1000, 1, 5, 10]))
    assert all(bool(torch.isfinite(t)) for t in losses)
    (losses.classes + losses.objectness).backward()
    assert bool(torch.isfinite(z.grad).all())
    assert bool(torch.isfinite(seesaw_probs(z.detach())).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_compute_in_float32(dtype):
    torch.manual_seed(7)
    num_classes = 400
    z = (torch.randn(64, num_classes + 2) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, num_classes + 1, (64,))
    counts = torch.randint(0, 10**6, (num_classes + 1,)) + seesaw_count_increments(
        labels, num_classes
    )
    z64 = z.detach().double()
    losses = seesaw_loss(z, labels, counts)
    expected = seesaw_loss(z64, labels, counts)
    for term, exp in zip(losses, expected):
        assert term.dtype == torch.float32
        _close(term, exp, atol=1e-6, rtol=1e-6)
    (losses.classes + losses.objectness).backward()
    assert z.grad.dtype == dtype and bool(torch.isfinite(z.grad.float()).all())
    for fn in (seesaw_probs, seesaw_class_probs):
        out = fn(z.detach())
        assert out.dtype == torch.float32
        _close(out, fn(z64), atol=1e-7, rtol=1e-6)
    assert seesaw_log_factors(z, labels, counts).dtype == torch.float32


# ---------------------------------------------------------------- soft targets (PCB)


def test_one_hot_class_targets_equal_hard_labels():
    rng = random.Random(8)
    z, labels, counts = _random_case(rng, 5, 12)
    zt, lt, ct = torch.tensor(z, dtype=torch.float64), torch.tensor(labels), torch.tensor(counts)
    one_hot = F.one_hot(lt.clamp(max=4), 5).double()
    one_hot[lt == 5] = 7.0  # background rows are ignored
    a = seesaw_loss(zt, lt, ct).classes
    b = seesaw_loss(zt, lt, ct, class_targets=one_hot).classes
    _close(b, a, atol=1e-14)


def test_soft_class_targets_match_loop_reference():
    # The factors come from the hard labels; the soft row replaces the one-hot in the CE.
    rng = random.Random(9)
    z, labels, counts = _random_case(rng, 6, 15)
    soft = []
    for label in labels:
        row = [rng.uniform(0, 1) for _ in range(6)]
        if label < 6:
            row[label] += 3.0
        soft.append([x / sum(row) for x in row])
    zt = torch.tensor(z, dtype=torch.float64)
    targets = torch.tensor(soft, dtype=torch.float64, requires_grad=True)
    losses = seesaw_loss(zt, torch.tensor(labels), torch.tensor(counts), class_targets=targets)
    exp_cls, exp_obj = _reference_losses(z, labels, counts, class_targets=soft)
    _close(losses.classes, exp_cls, atol=1e-12)
    _close(losses.objectness, exp_obj, atol=1e-12)
    assert not losses.classes.requires_grad  # no gradient into the targets (logits are constant)


# ---------------------------------------------------------------- scores (invariant 5)


def test_probs_rows_sum_to_one_background_last():
    rng = random.Random(10)
    z = [[rng.uniform(-10, 10) for _ in range(8)] for _ in range(9)]
    probs = seesaw_probs(torch.tensor(z, dtype=torch.float64))
    assert probs.shape == (9, 7)
    _close(probs.sum(1), [1.0] * 9, atol=1e-14)
    expected = []
    for row in z:
        cls, obj = _softmax(row[:6]), _softmax(row[6:])
        expected.append([c * obj[0] for c in cls] + [obj[1]])
    _close(probs, expected, atol=1e-14)
    class_probs = seesaw_class_probs(torch.tensor(z, dtype=torch.float64))
    _close(class_probs, [_softmax(row[:6]) for row in z], atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_with_cpu_counts():
    rng = random.Random(11)
    z, labels, counts = _random_case(rng, 5, 10)
    zt, lt, ct = torch.tensor(z), torch.tensor(labels), torch.tensor(counts, dtype=torch.float64)
    gpu = seesaw_loss(zt.cuda(), lt.cuda(), ct)
    cpu = seesaw_loss(zt, lt, ct)
    for a, b in zip(gpu, cpu):
        assert a.device.type == "cuda"
        _close(a.cpu(), b, atol=1e-6)
    inc = seesaw_count_increments(lt.cuda(), 5)
    assert (
        inc.device.type == "cuda" and inc.cpu().tolist() == seesaw_count_increments(lt, 5).tolist()
    )
    soft = torch.softmax(torch.randn(10, 5), 1)
    a = seesaw_loss(zt.cuda(), lt.cuda(), ct.cuda(), class_targets=soft.cuda()).classes
    _close(a.cpu(), seesaw_loss(zt, lt, ct, class_targets=soft).classes, atol=1e-6)


# ---------------------------------------------------------------- bad inputs

GOOD_Z = torch.zeros(2, 5)
GOOD_LABELS = torch.tensor([0, 3])
GOOD_COUNTS = torch.ones(4)


@pytest.mark.parametrize(
    "z, labels, counts, kwargs, match",
    [
        (torch.zeros(5), GOOD_LABELS, GOOD_COUNTS, {}, r"\(R, C\+2\)"),
        (torch.zeros(2, 2), GOOD_LABELS, torch.ones(1), {}, "C >= 1"),
        (torch.zeros(2, 5, dtype=torch.long), GOOD_LABELS, GOOD_COUNTS, {}, "float"),
        (GOOD_Z, torch.tensor([0, 4]), GOOD_COUNTS, {}, r"\[0, 3\]"),
        (GOOD_Z, torch.tensor([-1, 0]), GOOD_COUNTS, {}, r"\[0, 3\]"),
        (GOOD_Z, torch.tensor([0, 1, 2]), GOOD_COUNTS, {}, r"\(2,\)"),
        (GOOD_Z, torch.tensor([0.0, 3.0]), GOOD_COUNTS, {}, "integer"),
        (GOOD_Z, [0, 3], GOOD_COUNTS, {}, "integer"),
        (GOOD_Z, GOOD_LABELS, torch.ones(5), {}, r"\(4,\)"),
        (GOOD_Z, GOOD_LABELS, torch.tensor([1.0, -1.0, 0.0, 0.0]), {}, "finite and >= 0"),
        (GOOD_Z, GOOD_LABELS, torch.tensor([1.0, float("nan"), 0.0, 0.0]), {}, "finite and >= 0"),
        (GOOD_Z, GOOD_LABELS, GOOD_COUNTS, {"p": -0.5}, "Seesaw p"),
        (GOOD_Z, GOOD_LABELS, GOOD_COUNTS, {"q": float("inf")}, "Seesaw q"),
        (GOOD_Z, GOOD_LABELS, GOOD_COUNTS, {"eps": float("nan")}, "Seesaw eps"),
    ],
)
def test_bad_inputs_raise(z, labels, counts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        seesaw_loss(z, labels, counts, **kwargs)
    with pytest.raises(ValueError, match=match):
        seesaw_log_factors(z, labels, counts, **kwargs)


@pytest.mark.parametrize(
    "targets",
    [
        torch.zeros(2, 4),
        torch.zeros(2, 3, 1),
        torch.zeros(3, 3),
        torch.zeros(2, 3, dtype=torch.long),
    ],
)
def test_bad_class_targets_raise(targets):
    with pytest.raises(ValueError, match="class_targets"):
        seesaw_loss(GOOD_Z, GOOD_LABELS, GOOD_COUNTS, class_targets=targets)


@pytest.mark.parametrize(
    "labels, num_classes, match",
    [
        (torch.tensor([0, 4]), 3, r"\[0, 3\]"),
        (torch.tensor([[0, 1]]), 3, "integer"),
        (torch.tensor([0.0]), 3, "integer"),
        (torch.tensor([0]), 0, "num_classes"),
        (torch.tensor([0]), True, "num_classes"),
        (torch.tensor([0]), 2.0, "num_classes"),
    ],
)
def test_bad_count_inputs_raise(labels, num_classes, match):
    with pytest.raises(ValueError, match=match):
        seesaw_count_increments(labels, num_classes)


@pytest.mark.parametrize(
    "z", [torch.zeros(4), torch.zeros(2, 2), torch.zeros(2, 5, dtype=torch.long)]
)
def test_bad_probs_inputs_raise(z):
    for fn in (seesaw_probs, seesaw_class_probs):
        with pytest.raises(ValueError, match="cls_logits"):
            fn(z)
