"""Tests of longtail/functional/lda.py: LDA risks, adaptive alpha, divergence proxy, fg/bg head.

Expected numbers are either pinned from the worked examples of the LDA spec (§7 Ex. A-D) or
computed here independently (plain Python ``math`` or explicit per-class loops in float64); none
are produced by the module under test. Invariant numbers refer to the list in spec §7.
"""

import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from longtail.functional.lda import (
    BALANCED_NORMS,
    INTER_WEIGHTINGS,
    UNBALANCED_NORMS,
    accuracy_gap,
    adaptive_alpha,
    auto_ring_length,
    balanced_risk,
    fgbg_loss,
    inter_class_separation,
    intra_class_compactness,
    lda_class_weights,
    lda_probs,
    top1_accuracy_percent,
    top1_correct,
    unbalanced_risk,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LVIS_V1_STATS = os.path.join(
    os.path.dirname(REPO), "shared", "data", "lvis_v1_train_category_stats.json"
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _close(actual, expected, atol, rtol=0.0):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _ce(row, y):
    """-log softmax(row)[y] with Python floats."""
    m = max(row)
    return m + math.log(sum(math.exp(x - m) for x in row)) - row[y]


def _cos(a, b, eps=1e-8):
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return dot / (max(na, eps) * max(nb, eps))


def _reference_divergence(features, labels, margin=1.0, weights=None):
    """Intra (code form and paper eq. 7) and inter (three weightings) with explicit loops."""
    classes = sorted(set(labels))
    centers, d_intra, sizes = {}, {}, {}
    for c in classes:
        rows = [f for f, y in zip(features, labels) if y == c]
        sizes[c] = len(rows)
        centers[c] = [sum(col) / len(rows) for col in zip(*rows)]
        d_intra[c] = sum(1.0 - _cos(f, centers[c]) for f in rows) / len(rows)
    multi = [c for c in classes if sizes[c] >= 2]
    intra_code = sum(d_intra[c] for c in multi) / len(multi) if multi else 0.0
    intra_paper = sum(d_intra.values()) / len(classes)
    pairs = [(i, j) for i in classes for j in classes if i != j]
    hinge = {(i, j): max(0.0, margin - (1.0 - _cos(centers[i], centers[j]))) for i, j in pairs}
    inter = {"none": sum(hinge.values()) / len(pairs) if pairs else 0.0}
    if weights is not None:
        omega = {(i, j): weights[i] + weights[j] for i, j in pairs}
        inter["paper"] = sum(omega[p] * hinge[p] for p in pairs)
        inter["code"] = inter["paper"] / sum(omega.values()) if pairs else 0.0
    return intra_code, intra_paper, inter


def test_names():
    assert BALANCED_NORMS == ("code", "mean", "self_norm")
    assert INTER_WEIGHTINGS == ("none", "code", "paper")
    assert UNBALANCED_NORMS == ("positives", "sampled")


# ---------------------------------------------------------------- spec §7 Ex. A

EX_A_COUNTS = [100, 10, 1]
EX_A_LABELS = [0, 0, 1, 2]
EX_A_H_PRIME = [[2, 0, 0], [1, 1.5, 0], [0, 2, 0], [0.5, 0, 0.2]]
EX_A_H = [[1, 0, 0], [0, 1, 0], [0, 1, 0.5], [1, 0, 2]]


def _ex_a(dtype=torch.float64):
    return (
        torch.tensor(EX_A_H_PRIME, dtype=dtype),
        torch.tensor(EX_A_H, dtype=dtype),
        torch.tensor(EX_A_LABELS),
    )


def test_example_a_class_weights():
    w = lda_class_weights(EX_A_COUNTS)
    assert w.dtype == torch.float64 and w.shape == (3,)
    _close(w, [1 / 300, 1 / 30, 1 / 3], atol=0.0, rtol=1e-15)


def test_example_a_per_sample_ce_matches_spec():
    # The spec's per-sample numbers, re-derived here so the expected risks below are independent.
    _close(
        [_ce(r, y) for r, y in zip(EX_A_H_PRIME, EX_A_LABELS)],
        [0.239545, 1.104131, 0.239545, 1.153287],
        atol=5e-7,
    )
    _close(
        [_ce(r, y) for r, y in zip(EX_A_H, EX_A_LABELS)],
        [0.551445, 1.551445, 0.680270, 0.407606],
        atol=5e-7,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_example_a_risks(dtype):
    hp, h, y = _ex_a(dtype)
    eps_u = unbalanced_risk(hp, y)
    assert eps_u.dtype == dtype
    _close(eps_u, 0.684127, atol=1e-6)
    code = balanced_risk(h, y, EX_A_COUNTS, norm="code")
    mean = balanced_risk(h, y, EX_A_COUNTS, norm="mean")
    self_norm = balanced_risk(h, y, EX_A_COUNTS, norm="self_norm")
    _close(code, 0.165554, atol=1e-6)
    _close(mean, 4.594122, atol=5e-6)
    _close(self_norm, 0.443448, atol=1e-6)
    # Default is the code form; code / mean = N / N_tot = 4 / 111.
    _close(balanced_risk(h, y, EX_A_COUNTS), code, atol=0.0)
    _close(code / mean, 4 / 111, atol=1e-7)


def test_example_a_risks_match_python_reference():
    hp, h, y = _ex_a()
    ce_b = [_ce(r, t) for r, t in zip(EX_A_H, EX_A_LABELS)]
    w = [1 / (3 * EX_A_COUNTS[t]) for t in EX_A_LABELS]
    _close(
        unbalanced_risk(hp, y),
        sum(_ce(r, t) for r, t in zip(EX_A_H_PRIME, EX_A_LABELS)) / 4,
        atol=1e-12,
    )
    _close(
        balanced_risk(h, y, EX_A_COUNTS, "code"), sum(a * b for a, b in zip(w, ce_b)), atol=1e-12
    )
    _close(
        balanced_risk(h, y, EX_A_COUNTS, "mean"),
        sum(111 * a * b for a, b in zip(w, ce_b)) / 4,
        atol=1e-12,
    )
    _close(
        balanced_risk(h, y, EX_A_COUNTS, "self_norm"),
        sum(a * b for a, b in zip(w, ce_b)) / sum(w),
        atol=1e-12,
    )


def test_example_a_unbalanced_risk_over_sampled_rois():
    # Ex. A's 4 positives among R = 10 sampled RoIs: the summed CE over R, the detection
    # convention, is N / R of the paper's mean (0.684127 from the spec) ...
    hp, _, y = _ex_a()
    _close(unbalanced_risk(hp, y, num_sampled=10), 0.684127 * 4 / 10, atol=1e-6)
    ref = sum(_ce(r, t) for r, t in zip(EX_A_H_PRIME, EX_A_LABELS)) / 10
    _close(unbalanced_risk(hp, y, num_sampled=10), ref, atol=1e-12)
    # ... R = N is the paper's form, and each positive's gradient is N / R of the paper's.
    _close(unbalanced_risk(hp, y, num_sampled=4), unbalanced_risk(hp, y), atol=1e-15)
    a = hp.clone().requires_grad_(True)
    b = hp.clone().requires_grad_(True)
    unbalanced_risk(a, y).backward()
    unbalanced_risk(b, y, num_sampled=10).backward()
    _close(b.grad, a.grad * 4 / 10, atol=1e-15)


def test_unbalanced_risk_over_sampled_rois_without_positives():
    logits = torch.zeros(0, 3, requires_grad=True)
    loss = unbalanced_risk(logits, torch.zeros(0, dtype=torch.long), num_sampled=512)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (0, 3)


@pytest.mark.parametrize("num_sampled", [3, 0, -1, 2.5, True, "10"])
def test_unbalanced_risk_rejects_fewer_sampled_rois_than_positives(num_sampled):
    hp, _, y = _ex_a()
    with pytest.raises(ValueError, match="num_sampled"):
        unbalanced_risk(hp, y, num_sampled=num_sampled)


def test_example_a_accuracies_and_alpha_with_l_1():
    hp, h, y = _ex_a(torch.float32)
    assert top1_correct(hp, y).item() == 2 and top1_correct(h, y).item() == 3
    a_u, a_b = top1_accuracy_percent(hp, y), top1_accuracy_percent(h, y)
    assert a_u.item() == 50.0 and a_b.item() == 75.0
    assert a_u.dtype == torch.float32 and not a_u.requires_grad
    ring_u, ring_b = torch.zeros(1), torch.zeros(1)
    ring_u[0], ring_b[0] = a_u, a_b
    assert accuracy_gap(ring_u, ring_b).item() == -25.0
    assert adaptive_alpha(ring_u, ring_b, gamma=1.5).item() == 0.0


def test_accuracy_counts_have_no_grad():
    logits = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    for t in (top1_correct(logits, y), top1_accuracy_percent(logits, y)):
        assert not t.requires_grad and t.grad_fn is None and t.dtype == torch.float32
    _close(top1_accuracy_percent(logits, y), 100 * top1_correct(logits, y) / 6, atol=1e-5)


# ---------------------------------------------------------------- spec §7 Ex. B and invariant 2


def test_example_b_ring_buffer():
    length, gamma = 4, 1.5
    ring_u, ring_b = torch.zeros(length), torch.zeros(length)
    feeds = [(60, 50), (70, 50), (80, 40), (50, 50), (40, 60)]
    expected_gap = [2.5, 7.5, 17.5, 17.5, 10.0]
    expected_alpha = [3.952847, 20.539596, 73.207752, 73.207752, 31.622777]
    for step, (a_u, a_b) in enumerate(feeds):
        # Write before computing alpha, so the current batch counts (spec §2.3).
        ring_u[step % length] = a_u
        ring_b[step % length] = a_b
        _close(accuracy_gap(ring_u, ring_b), expected_gap[step], atol=1e-6)
        _close(adaptive_alpha(ring_u, ring_b, gamma), expected_alpha[step], atol=1e-5, rtol=1e-6)
    # Step 5 overwrote slot 0.
    assert ring_u.tolist() == [40, 70, 80, 50] and ring_b.tolist() == [60, 50, 40, 50]


def test_alpha_bounds_and_no_grad():
    ring_u = torch.full((5,), 100.0, requires_grad=True)
    ring_b = torch.zeros(5, requires_grad=True)
    for gamma in (0.6, 1.0, 1.5, 2.0):
        alpha = adaptive_alpha(ring_u, ring_b, gamma)
        assert not alpha.requires_grad and alpha.grad_fn is None
        _close(alpha, 100.0**gamma, atol=0.0, rtol=1e-6)  # the upper bound is reached
    assert not accuracy_gap(ring_u, ring_b).requires_grad
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        u = torch.rand(7, generator=gen) * 100
        b = torch.rand(7, generator=gen) * 100
        alpha = adaptive_alpha(u, b, 1.5)
        assert 0.0 <= alpha.item() <= 100.0**1.5 + 1e-3
        if b.double().mean() >= u.double().mean():
            assert alpha.item() == 0.0
        else:
            _close(alpha, (u.double().mean() - b.double().mean()) ** 1.5, atol=1e-4, rtol=1e-6)
    # mean(B) == mean(U) exactly: 0, not a tiny power.
    assert adaptive_alpha(torch.tensor([30.0, 70.0]), torch.tensor([50.0, 50.0]), 2.0).item() == 0


@pytest.mark.parametrize("length", [1, 3, 10])
def test_alpha_after_l_constant_gap_updates(length):
    gamma, d = 1.5, 12.5
    ring_u, ring_b = torch.zeros(length), torch.zeros(length)
    rng = random.Random(length)
    for step in range(length + 3):
        a_b = rng.uniform(0.0, 80.0)
        ring_u[step % length] = a_b + d
        ring_b[step % length] = a_b
        if step >= length - 1:  # every slot written at least once
            _close(adaptive_alpha(ring_u, ring_b, gamma), d**gamma, atol=1e-3)
        else:  # zero-initialised slots still count: a smaller gap, the implicit warm-up
            _close(accuracy_gap(ring_u, ring_b), d * (step + 1) / length, atol=1e-4)


def test_alpha_keeps_float64_rings():
    u, b = torch.tensor([60.0], dtype=torch.float64), torch.tensor([50.0], dtype=torch.float64)
    assert adaptive_alpha(u, b, 2.0).dtype == torch.float64
    assert adaptive_alpha(u.float(), b.float(), 2.0).dtype == torch.float32


def test_auto_ring_length():
    # max(1, floor(N_tot / (min n_c * batch))): 111 / (1 * 4) = 27.75.
    assert auto_ring_length(EX_A_COUNTS, 4) == 27
    assert auto_ring_length([10, 10], 64) == 1
    assert auto_ring_length([0, 5, 5], 2) == 5  # 0 clamped to 1: 11 / 2


# ---------------------------------------------------------------- invariant 1: class weights


def test_class_weights_sum_to_one():
    gen = torch.Generator().manual_seed(1)
    counts = torch.randint(1, 5000, (57,), generator=gen)
    w = lda_class_weights(counts)
    assert bool((w > 0).all())
    _close((counts.double() * w).sum(), 1.0, atol=1e-13)


def test_equal_counts_give_scaled_mean_ce():
    # n_c = n for all c: eps_b^C = N / (C n) * mean_i l_i, and mean = self_norm = plain mean CE.
    gen = torch.Generator().manual_seed(2)
    num_classes, n, num = 5, 40, 9
    logits = torch.randn(num, num_classes, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (num,), generator=gen)
    mean_ce = F.cross_entropy(logits, y)
    counts = [n] * num_classes
    _close(balanced_risk(logits, y, counts, "code"), num / (num_classes * n) * mean_ce, atol=1e-12)
    _close(balanced_risk(logits, y, counts, "mean"), mean_ce, atol=1e-12)
    _close(balanced_risk(logits, y, counts, "self_norm"), mean_ce, atol=1e-12)


def test_norm_relations_on_random_batches():
    gen = torch.Generator().manual_seed(3)
    counts = torch.randint(1, 1000, (12,), generator=gen).double()
    logits = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 12, (20,), generator=gen)
    code = balanced_risk(logits, y, counts, "code")
    _close(balanced_risk(logits, y, counts, "mean"), code * counts.sum() / 20, atol=1e-12)
    w_y = lda_class_weights(counts)[y]
    _close(balanced_risk(logits, y, counts, "self_norm"), code / w_y.sum(), atol=1e-12)
    # Scaling every count by 10: code / 10, mean and self_norm unchanged.
    _close(balanced_risk(logits, y, counts * 10, "code"), code / 10, atol=1e-13)
    for norm in ("mean", "self_norm"):
        _close(
            balanced_risk(logits, y, counts * 10, norm),
            balanced_risk(logits, y, counts, norm),
            atol=1e-12,
        )


def test_lvis_v1_weights():
    if not os.path.exists(LVIS_V1_STATS):
        pytest.skip(f"{LVIS_V1_STATS} not found")
    with open(LVIS_V1_STATS) as f:
        cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    counts = torch.tensor([c["instance_count"] for c in cats], dtype=torch.float64)
    assert counts.numel() == 1203 and counts.sum().item() == 1270141
    w = lda_class_weights(counts)
    _close((counts * w).sum(), 1.0, atol=1e-12)
    _close(w.min(), 1 / (1203 * counts.max().item()), atol=0.0, rtol=1e-15)
    assert w.min().item() == pytest.approx(1.64e-8, rel=0.01)  # spec §8: ~1.6e-8
    assert torch.tensor(w.min().item(), dtype=torch.float16).item() == 0.0  # why fp32 is needed


def test_zero_count_classes_are_clamped_to_one():
    w = lda_class_weights([5, 0, 3])
    _close(w, [1 / 15, 1 / 3, 1 / 9], atol=0.0, rtol=1e-15)
    assert bool(torch.isfinite(w).all())
    logits = torch.tensor([[0.3, 1.0, -0.2], [2.0, 0.0, 0.1]], dtype=torch.float64)
    y = torch.tensor([1, 0])  # the zero-count class is present
    for norm in BALANCED_NORMS:
        got = balanced_risk(logits, y, [5, 0, 3], norm)
        assert torch.isfinite(got)
        _close(got, balanced_risk(logits, y, [5, 1, 3], norm), atol=0.0)


# ---------------------------------------------------------------- spec §7 Ex. C

EX_C_FEATURES = [[1, 0], [0, 1], [-1, 0], [1, 1], [2, 2]]
EX_C_LABELS = [0, 0, 1, 2, 2]


def _ex_c(dtype=torch.float64):
    return torch.tensor(EX_C_FEATURES, dtype=dtype, requires_grad=True), torch.tensor(EX_C_LABELS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_example_c_divergence(dtype):
    f, y = _ex_c(dtype)
    w = lda_class_weights(EX_A_COUNTS)
    intra = intra_class_compactness(f, y)
    assert intra.dtype == dtype
    _close(intra, 0.146447, atol=1e-6)
    _close(inter_class_separation(f, y), 0.333333, atol=1e-6)
    _close(inter_class_separation(f, y, weighting="none"), 0.333333, atol=1e-6)
    _close(inter_class_separation(f, y, weighting="paper", class_weights=w), 0.673333, atol=1e-6)
    _close(inter_class_separation(f, y, weighting="code", class_weights=w), 0.454955, atol=1e-6)
    # The loop reference agrees, and paper eq. 7 (all C_b classes) would give 0.097631.
    ref_intra, ref_intra_paper, ref_inter = _reference_divergence(
        EX_C_FEATURES, EX_C_LABELS, weights=w.tolist()
    )
    _close(ref_intra, 0.146447, atol=1e-6)
    _close(ref_intra_paper, 0.097631, atol=1e-6)
    _close(ref_inter["code"], 0.454955, atol=1e-6)


def test_example_c_combined_totals():
    hp, h, y = _ex_a()
    ring_u, ring_b = torch.zeros(4), torch.zeros(4)
    for step, (a_u, a_b) in enumerate([(60, 50), (70, 50)]):  # Ex. B up to step 2
        ring_u[step % 4], ring_b[step % 4] = a_u, a_b
    alpha = adaptive_alpha(ring_u.double(), ring_b.double(), 1.5)
    _close(alpha, 20.539596, atol=1e-6)
    f, yc = _ex_c()
    divergence = intra_class_compactness(f, yc) + inter_class_separation(f, yc)
    eps_u, eps_b = unbalanced_risk(hp, y), balanced_risk(h, y, EX_A_COUNTS)
    _close(eps_u + 1 * alpha * eps_b + 0.1 * divergence, 4.132516, atol=2e-6)
    _close(eps_u + 2 * alpha * eps_b + 0.1 * divergence, 7.532927, atol=2e-6)


def test_example_c_gradient_flows_through_centers():
    # Invariant 6: same value with mu attached or detached, different gradients.
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    y = torch.zeros(3, dtype=torch.long)
    loss = intra_class_compactness(f, y)
    _close(loss, 0.210890, atol=1e-6)
    (grad_attached,) = torch.autograd.grad(loss, f)
    _close(grad_attached[0], [-0.036420, -0.253070], atol=1e-6)

    # The same formula written out with mu detached.
    mu = f.mean(dim=0, keepdim=True).detach()
    detached = (1 - F.cosine_similarity(f, mu.expand_as(f), dim=1)).mean()
    _close(detached, loss, atol=1e-12)
    (grad_detached,) = torch.autograd.grad(detached, f)
    _close(grad_detached[0], [0.0, -0.277350], atol=1e-6)
    assert (grad_attached - grad_detached).abs().max() > 1e-2


def test_inter_gradient_flows_through_centers():
    # Moving a feature moves its class center, so every feature of a hinged pair gets a gradient.
    # mu_0 = (0.5, 0.5) and mu_2 = (1.5, 0.25) (acute, not collinear: cos is not at its maximum);
    # mu_1 = (-1, 0) is at an obtuse angle to both, so its hinges are inactive.
    f = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 0.5], [1.0, 0.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    y = torch.tensor([0, 0, 1, 2, 2])
    (grad,) = torch.autograd.grad(inter_class_separation(f, y), f)
    assert grad[[0, 1, 3, 4]].abs().sum(dim=1).min() > 1e-3
    assert grad[2].abs().sum() == 0
    # Both features of a class get the same gradient: d mu_c / d F_i = 1/|c| for each i in c.
    _close(grad[0], grad[1], atol=1e-15)
    _close(grad[3], grad[4], atol=1e-15)


# ---------------------------------------------------------------- invariants 4 and 5


def _random_batch(seed, num=40, dim=6, num_classes=7, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(num, dim, generator=gen, dtype=dtype) + 0.7  # correlated: hinges active
    y = torch.randint(0, num_classes, (num,), generator=gen)
    return f, y


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference_on_random_batches(seed):
    f, y = _random_batch(seed)
    w = lda_class_weights(torch.arange(1, 8) * 13)
    ref_intra, _, ref_inter = _reference_divergence(f.tolist(), y.tolist(), 1.0, w.tolist())
    _close(intra_class_compactness(f, y), ref_intra, atol=1e-12)
    for weighting in INTER_WEIGHTINGS:
        _close(
            inter_class_separation(f, y, weighting=weighting, class_weights=w),
            ref_inter[weighting],
            atol=1e-12,
        )
    # A different margin.
    _, _, ref_inter_m = _reference_divergence(f.tolist(), y.tolist(), 0.4)
    _close(inter_class_separation(f, y, margin=0.4), ref_inter_m["none"], atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_divergence_ranges_and_invariances(seed):
    f, y = _random_batch(seed)
    w = lda_class_weights(torch.arange(1, 8) * 13)
    gen = torch.Generator().manual_seed(100 + seed)

    def all_terms(feats, labels, weights):
        out = [intra_class_compactness(feats, labels)]
        out += [
            inter_class_separation(feats, labels, weighting=k, class_weights=weights)
            for k in INTER_WEIGHTINGS
        ]
        return torch.stack(out)

    base = all_terms(f, y, w)
    assert 0.0 <= base[0] <= 2.0
    assert 0.0 < base[1] <= 1.0 and 0.0 < base[2] <= 1.0  # mean forms in [0, margin]
    for s in (1e-3, 0.37, 250.0):  # scale
        _close(all_terms(f * s, y, w), base, atol=1e-10)
    perm = torch.randperm(f.shape[0], generator=gen)  # sample order
    _close(all_terms(f[perm], y[perm], w), base, atol=1e-12)
    relabel = torch.randperm(7, generator=gen)  # class ids: old c -> relabel[c], weights follow
    w_new = torch.empty_like(w)
    w_new[relabel] = w
    _close(all_terms(f, relabel[y], w_new), base, atol=1e-12)
    # Non-contiguous, large ids work the same for the unweighted terms.
    sparse = y * 100 + 3
    _close(intra_class_compactness(f, sparse), base[0], atol=1e-12)
    _close(inter_class_separation(f, sparse), base[1], atol=1e-12)


def test_positively_collinear_classes_have_zero_intra():
    directions = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]], dtype=torch.float64)
    scales = torch.tensor([0.5, 1.0, 4.0, 2.0, 0.1], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1])
    f = scales[:, None] * directions[y]
    _close(intra_class_compactness(f, y), 0.0, atol=1e-12)


def test_centers_at_or_beyond_orthogonal_give_zero_inter():
    # Centers along +x, +y, -x and -y: every pair has cos 0 or -1.
    f = torch.tensor(
        [[1.0, 0.1], [1.0, -0.1], [0.0, 2.0], [-3.0, 0.0], [0.0, -1.0]], requires_grad=True
    )
    y = torch.tensor([0, 0, 1, 2, 3])
    loss = inter_class_separation(f, y)
    assert loss.item() == 0.0
    loss.backward()
    assert bool(torch.isfinite(f.grad).all())


def test_single_class_batch_gives_zero_inter_not_nan():
    f = torch.randn(5, 4, requires_grad=True)
    y = torch.full((5,), 3)
    w = lda_class_weights([1.0] * 10)
    for weighting in INTER_WEIGHTINGS:
        loss = inter_class_separation(f, y, weighting=weighting, class_weights=w)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, f)
        assert bool((grad == 0).all())
    # Intra is still defined for that single class.
    assert intra_class_compactness(f, y).item() > 0


def test_only_singletons_give_zero_intra():
    f = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 5, 2, 9])
    loss = intra_class_compactness(f, y)
    assert loss.item() == 0.0
    loss.backward()
    assert bool((f.grad == 0).all())
    assert inter_class_separation(f, y).item() >= 0  # 4 singleton classes still have centers


def test_singletons_are_excluded_from_the_intra_mean():
    # A non-collinear pair plus a singleton: the mean is over the pair's class only.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], dtype=torch.float64)
    _close(intra_class_compactness(f, torch.tensor([0, 0, 1])), 1 - math.sqrt(0.5), atol=1e-12)


def test_zero_norm_center_gives_no_nan():
    # Class 0's features cancel: mu_0 = 0. Cosines with it are 0, gradients stay finite.
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.5, 0.5], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    w = lda_class_weights([3, 4])
    terms = [intra_class_compactness(f, y)]
    terms += [inter_class_separation(f, y, weighting=k, class_weights=w) for k in INTER_WEIGHTINGS]
    for t in terms:
        assert torch.isfinite(t)
    _close(terms[0], (1.0 + 0.5) / 2, atol=1e-6)  # class 0: d = 1; class 1: (0 + 1) / 2
    _close(terms[1], 0.0, atol=0.0)
    torch.stack(terms).sum().backward()
    assert bool(torch.isfinite(f.grad).all())


def test_zero_norm_center_gradient_is_bounded():
    # Unit vectors of class 0 do not cancel although the features do: a plain x / max(|x|, eps)
    # would send a ~1e7 gradient from the zero center into these features.
    f = torch.tensor(
        [[2.0, 0.0], [-1.0, 1.0], [-1.0, -1.0], [0.3, 0.4], [0.6, 0.1]],
        dtype=torch.float64,
        requires_grad=True,
    )
    y = torch.tensor([0, 0, 0, 1, 1])
    loss = intra_class_compactness(f, y) + inter_class_separation(f, y)
    loss.backward()
    assert bool(torch.isfinite(f.grad).all()) and f.grad.abs().max() < 10
    # Class 0: d = 1 (cosines with a zero center are 0); the hinge with it is inactive.
    ref_intra, _, ref_inter = _reference_divergence(f.tolist(), y.tolist())
    _close(intra_class_compactness(f, y), ref_intra, atol=1e-12)
    _close(inter_class_separation(f, y), ref_inter["none"], atol=1e-12)


def test_gradcheck_divergence():
    f, y = _random_batch(7, num=10, dim=3, num_classes=3)
    f.requires_grad_(True)
    w = lda_class_weights([2, 7, 30])
    assert torch.autograd.gradcheck(lambda x: intra_class_compactness(x, y), (f,))
    for weighting in INTER_WEIGHTINGS:
        assert torch.autograd.gradcheck(
            lambda x: inter_class_separation(x, y, weighting=weighting, class_weights=w), (f,)
        )


# ---------------------------------------------------------------- invariant 3: gradient routing


class _Head(torch.nn.Module):
    """Shared feature z from a trunk layer; g, h', h and p on z (spec §2.6)."""

    def __init__(self, d_in=5, d_z=8, num_classes=4, d_proj=6):
        super().__init__()
        self.trunk = torch.nn.Linear(d_in, d_z)
        self.g = torch.nn.Linear(d_z, 2)
        self.h_prime = torch.nn.Linear(d_z, num_classes)
        self.h = torch.nn.Linear(d_z, num_classes)
        self.p = torch.nn.Linear(d_z, d_proj)

    def forward(self, x):
        z = self.trunk(x)
        return self.g(z), self.h_prime(z), self.h(z), self.p(z)


def _grads(loss, module):
    names = ("trunk", "g", "h_prime", "h", "p")
    out = {}
    for name in names:
        params = list(getattr(module, name).parameters())
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[name] = sum(0.0 if g is None else g.abs().sum().item() for g in grads)
    return out


def _detection_batch(seed, num_rois=12, num_classes=4):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = _Head(num_classes=num_classes)
    x = torch.randn(num_rois, 5, generator=gen)
    gt = torch.randint(0, num_classes + 1, (num_rois,), generator=gen)  # num_classes = background
    gt[:3] = torch.tensor([0, 0, 2])  # at least two positives of one class, two classes
    gt[3:5] = num_classes  # and some background
    return head, x, gt


def test_gradient_routing():
    num_classes = 4
    head, x, gt = _detection_batch(0, num_classes=num_classes)
    counts = [50, 20, 5, 1]
    fg = gt < num_classes
    g, hp, h, proj = head(x)
    pos_y = gt[fg]
    terms = {
        "eps_u": unbalanced_risk(hp[fg], pos_y),
        "eps_b": balanced_risk(h[fg], pos_y, counts),
        "divergence": intra_class_compactness(proj[fg], pos_y)
        + inter_class_separation(proj[fg], pos_y),
        "fgbg": fgbg_loss(g, fg),
    }
    reaches = {
        "eps_u": {"trunk", "h_prime"},
        "eps_b": {"trunk", "h"},
        "divergence": {"trunk", "p"},
        "fgbg": {"trunk", "g"},
    }
    for term, loss in terms.items():
        assert loss.item() > 0, term
        grads = _grads(loss, head)
        for name, total in grads.items():
            if name in reaches[term]:
                assert total > 0, f"{term} should reach {name}"
            else:
                assert total == 0, f"{term} must not reach {name}"

    # Changing h / h' / p outputs on background RoIs changes no loss: zero gradient on their rows.
    lda_total = terms["eps_u"] + terms["eps_b"] + terms["divergence"]
    for out in (hp, h, proj):
        (grad,) = torch.autograd.grad(lda_total, out, retain_graph=True)
        assert bool((grad[~fg] == 0).all()) and grad[fg].abs().sum() > 0


def test_empty_positive_set_backward_succeeds():
    # |P| = 0 (spec §2.6, invariant 5): every LDA term is 0, backward gives zero, finite grads.
    num_classes = 4
    head, x, gt = _detection_batch(1, num_classes=num_classes)
    gt[:] = num_classes
    fg = gt < num_classes
    g, hp, h, proj = head(x)
    pos_y = gt[fg]
    w = lda_class_weights([50, 20, 5, 1])
    lda_terms = [unbalanced_risk(hp[fg], pos_y)]
    lda_terms += [balanced_risk(h[fg], pos_y, [50, 20, 5, 1], norm) for norm in BALANCED_NORMS]
    lda_terms += [intra_class_compactness(proj[fg], pos_y)]
    lda_terms += [
        inter_class_separation(proj[fg], pos_y, weighting=k, class_weights=w)
        for k in INTER_WEIGHTINGS
    ]
    for t in lda_terms:
        assert t.item() == 0.0 and t.requires_grad
    assert top1_correct(hp[fg], pos_y).item() == 0
    assert top1_accuracy_percent(h[fg], pos_y).item() == 0.0
    total = torch.stack(lda_terms).sum() + fgbg_loss(g, fg)
    total.backward()
    for name in ("h_prime", "h", "p"):
        for param in getattr(head, name).parameters():
            assert param.grad is not None and bool((param.grad == 0).all())
    assert head.g.weight.grad.abs().sum() > 0  # fg/bg still trains on the background RoIs


def test_empty_inputs_everywhere():
    empty_logits = torch.zeros(0, 3, requires_grad=True)
    empty_y = torch.zeros(0, dtype=torch.long)
    empty_f = torch.zeros(0, 4, requires_grad=True)
    assert fgbg_loss(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, dtype=torch.bool)) == 0
    assert lda_probs(torch.zeros(0, 2), torch.zeros(0, 3)).shape == (0, 4)
    for t in (
        unbalanced_risk(empty_logits, empty_y),
        intra_class_compactness(empty_f, empty_y),
        inter_class_separation(empty_f, empty_y),
    ):
        assert t.item() == 0.0
        t.backward()


# ---------------------------------------------------------------- spec §7 Ex. D and invariant 7


def test_example_d_scores():
    g = torch.tensor([[math.log(0.8), math.log(0.2)]])
    h = torch.tensor([[1.0, 0.5, 0.0]])
    probs = lda_probs(g, h)
    assert probs.shape == (1, 4) and probs.dtype == torch.float32
    _close(probs, [[0.405184, 0.245757, 0.149059, 0.2]], atol=1e-6)
    _close(F.softmax(h, dim=1), [[0.506480, 0.307196, 0.186324]], atol=1e-6)


def test_scores_invariants():
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(30, 2, generator=gen, dtype=torch.float64) * 3
    h = torch.randn(30, 9, generator=gen, dtype=torch.float64) * 3
    probs = lda_probs(g, h)
    p_fg = F.softmax(g, dim=1)[:, 0]
    _close(probs.sum(dim=1), torch.ones(30), atol=1e-12)
    _close(probs[:, :-1].sum(dim=1), p_fg, atol=1e-12)  # sum_c s_c = P(fg)
    _close(probs[:, -1], 1 - p_fg, atol=1e-12)  # background last
    assert torch.equal(probs[:, :-1].argmax(dim=1), h.argmax(dim=1))
    # Inference only sees g and h: shifting h's logits by a per-row constant changes nothing.
    _close(
        lda_probs(g, h + torch.randn(30, 1, generator=gen, dtype=torch.float64)), probs, atol=1e-12
    )


def test_fgbg_loss_columns_and_value():
    logits = torch.tensor([[3.0, -1.0], [0.2, 0.4], [-2.0, 2.0]], dtype=torch.float64)
    is_fg = torch.tensor([True, True, False])
    expected = (_ce([3.0, -1.0], 0) + _ce([0.2, 0.4], 0) + _ce([-2.0, 2.0], 1)) / 3
    _close(fgbg_loss(logits, is_fg), expected, atol=1e-12)
    # Column 0 is foreground: a confident fg logit on a positive is a small loss.
    assert fgbg_loss(torch.tensor([[9.0, -9.0]]), torch.tensor([True])).item() < 1e-6
    assert fgbg_loss(torch.tensor([[9.0, -9.0]]), torch.tensor([False])).item() > 10


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    gen = torch.Generator().manual_seed(6)
    num_classes = 6
    # LVIS-like range: the frequent class's weight 1/(6 * 50552) ~ 3.3e-6 ... and 1 / (6 * 1).
    counts = [50552, 9000, 300, 20, 2, 1]
    logits = (torch.randn(32, num_classes, generator=gen) * 2).to(dtype)
    y = torch.randint(0, num_classes, (32,), generator=gen)
    y[:8] = 0  # the head class dominates, as on LVIS
    ref_logits = logits.double()
    for norm in BALANCED_NORMS:
        got = balanced_risk(logits, y, counts, norm)
        assert got.dtype == torch.float32
        _close(got, balanced_risk(ref_logits, y, counts, norm), atol=0.0, rtol=1e-5)
    got = unbalanced_risk(logits, y)
    assert got.dtype == torch.float32
    _close(got, unbalanced_risk(ref_logits, y), atol=0.0, rtol=1e-5)

    feats = (torch.randn(32, 8, generator=gen) + 0.5).to(dtype)
    w = lda_class_weights(counts)
    for fn in (
        intra_class_compactness,
        lambda f, t: inter_class_separation(f, t, weighting="code", class_weights=w),
        lambda f, t: inter_class_separation(f, t, weighting="paper", class_weights=w),
    ):
        got = fn(feats, y)
        assert got.dtype == torch.float32
        _close(got, fn(feats.double(), y), atol=1e-6, rtol=1e-5)

    g = torch.randn(32, 2, generator=gen).to(dtype)
    assert fgbg_loss(g, y > 2).dtype == torch.float32
    probs = lda_probs(g, logits)
    assert probs.dtype == torch.float32
    _close(probs, lda_probs(g.double(), ref_logits), atol=1e-6)


def test_code_form_keeps_a_head_class_term_that_fp16_would_drop():
    # The head-class weight 1/(1203 * 50552) ~ 1.6e-8 is 0 in fp16; the module keeps it.
    counts = torch.ones(1203)
    counts[0] = 50552
    logits = torch.zeros(2, 1203, dtype=torch.float16)
    y = torch.tensor([0, 0])
    got = balanced_risk(logits, y, counts)
    expected = 2 * math.log(1203) / (1203 * 50552)
    _close(got, expected, atol=0.0, rtol=1e-5)
    assert got.item() > 0


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_error():
    hp, h, y = _ex_a(torch.float32)
    f, yc = _ex_c()
    w = lda_class_weights(EX_A_COUNTS)
    cases = [
        (lambda: balanced_risk(h, y, EX_A_COUNTS, norm="sum"), "norm"),
        (lambda: inter_class_separation(f, yc, weighting="effective"), "weighting"),
        (lambda: inter_class_separation(f, yc, weighting="code"), "class_weights"),
        (
            lambda: inter_class_separation(f, yc, weighting="paper", class_weights=w[:2]),
            "index class_weights",
        ),
        (lambda: inter_class_separation(f, yc, weighting="code", class_weights=w * 0), "> 0"),
        (lambda: inter_class_separation(f, yc, margin=0.0), "margin"),
        (lambda: inter_class_separation(f, yc, margin=float("nan")), "margin"),
        (lambda: unbalanced_risk(hp, y[:3]), "labels"),
        (lambda: unbalanced_risk(hp[0], y), "logits"),
        (lambda: unbalanced_risk(hp, y.float()), "integer"),
        (lambda: unbalanced_risk(hp, torch.tensor([0, 0, 1, 3])), r"\[0, C\)"),
        (lambda: balanced_risk(h, torch.tensor([0, -1, 1, 2]), EX_A_COUNTS), r"\[0, C\)"),
        (lambda: balanced_risk(h, y, [100, 10]), "class_counts"),
        (lambda: balanced_risk(h, y, [100, -10, 1]), "non-negative"),
        (lambda: balanced_risk(h, y, [[100, 10, 1]]), "1-D"),
        (lambda: lda_class_weights([]), "non-empty"),
        (lambda: lda_class_weights([1.0, float("inf")]), "finite"),
        (lambda: top1_correct(hp, y[:2]), "labels"),
        (lambda: intra_class_compactness(f[:, 0], yc), r"\(N, D\)"),
        (lambda: intra_class_compactness(f, yc[:4]), "labels"),
        (lambda: intra_class_compactness(f.long(), yc), "floating"),
        (lambda: fgbg_loss(h, y > 0), r"\(R, 2\)"),
        (lambda: fgbg_loss(h[:, :2], y), "bool"),
        (lambda: fgbg_loss(h[:, :2], (y > 0)[:3]), "bool"),
        (lambda: lda_probs(h[:, :2], h[:3]), "lda_probs"),
        (lambda: lda_probs(h, h), "lda_probs"),
        (lambda: adaptive_alpha(torch.zeros(4), torch.zeros(3), 1.5), "same length"),
        (lambda: adaptive_alpha(torch.zeros(0), torch.zeros(0), 1.5), "non-empty"),
        (lambda: adaptive_alpha(torch.zeros(4, dtype=torch.long), torch.zeros(4), 1.5), "floating"),
        (lambda: adaptive_alpha(torch.zeros(4), torch.zeros(4), 0.0), "gamma"),
        (lambda: adaptive_alpha(torch.zeros(4), torch.zeros(4), "1.5"), "gamma"),
        (lambda: accuracy_gap(torch.zeros(2, 2), torch.zeros(2, 2)), "1-D"),
        (lambda: auto_ring_length(EX_A_COUNTS, 0), "batch_size"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


# ---------------------------------------------------------------- CUDA


@CUDA
def test_cuda_matches_examples_with_cpu_counts():
    dev = torch.device("cuda")
    hp, h, y = (t.to(dev) for t in _ex_a(torch.float32))
    _close(unbalanced_risk(hp, y).cpu(), 0.684127, atol=1e-6)
    for norm, expected in zip(BALANCED_NORMS, (0.165554, 4.594122, 0.443448)):
        got = balanced_risk(h.half(), y, EX_A_COUNTS, norm)  # counts on the CPU
        assert got.device.type == "cuda" and got.dtype == torch.float32
        _close(got.cpu(), expected, atol=2e-3 * expected)  # fp16 logits are exact here
    assert top1_correct(h, y).item() == 3
    f = torch.tensor(EX_C_FEATURES, device=dev, requires_grad=True)
    yc = torch.tensor(EX_C_LABELS, device=dev)
    w = lda_class_weights(torch.tensor(EX_A_COUNTS, device=dev))
    _close(intra_class_compactness(f, yc).cpu(), 0.146447, atol=1e-6)
    _close(
        inter_class_separation(f, yc, weighting="code", class_weights=w).cpu(), 0.454955, atol=1e-6
    )
    with torch.autocast("cuda", dtype=torch.float16):
        proj = torch.nn.Linear(2, 3).to(dev)(f)
        assert proj.dtype == torch.float16
        loss = intra_class_compactness(proj, yc) + inter_class_separation(proj, yc)
    assert loss.dtype == torch.float32
    loss.backward()
    assert bool(torch.isfinite(f.grad).all())
    ring_u = torch.zeros(4, device=dev)
    ring_b = torch.zeros(4, device=dev)
    ring_u[0], ring_b[0] = 60, 50
    _close(adaptive_alpha(ring_u, ring_b, 1.5).cpu(), 3.952847, atol=1e-5)
