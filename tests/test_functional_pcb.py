"""Tests of longtail/functional/pcb.py: PCB statistics, EMA, fightback targets, loss and gating.

Expected numbers are either pinned from the worked examples of the PCB spec (§7 Ex. A-C and the
schedule) or computed here independently (plain Python ``math`` loops in float64, or autograd on a
cross-entropy written out in this file); none are produced by the module under test. The
numbered invariants refer to spec §7.
"""

import io
import math
import random

import pytest
import torch
import torch.nn.functional as F

from longtail.functional.pcb import (
    pairwise_bias,
    pcb_active,
    pcb_batch_statistics,
    pcb_ema_update,
    pcb_fightback_targets,
    pcb_mixed_targets,
    pcb_step_alphas,
    soft_cross_entropy,
)


def _close(actual, expected, atol, rtol=0.0):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _buffers(num_classes):
    """Fresh PCB state as the caller owns it: zero fp32 matrix, zero float64 counter."""
    return torch.zeros(num_classes, num_classes), torch.zeros(num_classes, dtype=torch.float64)


def _fg_probs(logits, labels, num_classes, sigmoid=False):
    """The caller's side: select fg rows and take the base's probabilities of the C fg logits."""
    fg = labels < num_classes
    z = logits[fg, :num_classes]
    return (torch.sigmoid(z) if sigmoid else torch.softmax(z, dim=1)), labels[fg]


def _update(matrix, seen, probs, labels, **kwargs):
    pcb_ema_update(matrix, seen, pcb_batch_statistics(probs, labels), **kwargs)


def _random_probs(gen, rows, cols):
    return torch.softmax(torch.randn(rows, cols, generator=gen) * 2, dim=1)


# ---------------------------------------------------------------- plain-Python references


def _ref_statistics(probs, labels, num_classes):
    sums = [[0.0] * num_classes for _ in range(num_classes)]
    counts = [0.0] * num_classes
    for row, y in zip(probs, labels):
        counts[y] += 1.0
        for j, p in enumerate(row):
            sums[y][j] += p
    return sums, counts


def _ref_ema(matrix, probs, labels, momentum, renormalize):
    """Spec §2.1 with Python floats: EMA of present rows toward the batch mean, re-normalised."""
    num_classes = len(matrix)
    sums, counts = _ref_statistics(probs, labels, num_classes)
    out = [row[:] for row in matrix]
    for i in range(num_classes):
        if counts[i] == 0:
            continue
        row = [momentum * m + (1 - momentum) * s / counts[i] for m, s in zip(matrix[i], sums[i])]
        if renormalize:
            total = sum(row)
            row = [v / total for v in row]
        out[i] = row
    return out


def _log_softmax(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def _ref_decomposed_loss(logits, labels, matrix, alpha):
    """(1/N) [sum_bg CE + sum_fg ((1 - a) CE + a H(M_hat[:, y], z))], H over C+1 log-softmax."""
    num_classes = len(matrix)
    col_sums = [sum(matrix[k][j] for k in range(num_classes)) for j in range(num_classes)]
    total = 0.0
    for z, y in zip(logits, labels):
        ls = _log_softmax(z)
        if y == num_classes:
            total += -ls[y]
        else:
            target = [matrix[i][y] / col_sums[y] for i in range(num_classes)]
            pcb = -sum(t * ls[i] for i, t in enumerate(target))
            total += (1 - alpha) * (-ls[y]) + alpha * pcb
    return total / len(logits)


# ---------------------------------------------------------------- worked examples (spec §7)

EX_A_BATCH1 = ([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1]], [0, 0, 1])
EX_A_BATCH2 = ([[0.2, 0.6, 0.2], [0.3, 0.3, 0.4]], [0, 2])


def _logits_from_probs(probs, labels, bg_rois, num_classes):
    """Fg logits log(p) (exact probabilities after softmax) plus bg RoIs with arbitrary logits."""
    fg = torch.tensor(probs, dtype=torch.float64).log()
    bg = torch.tensor([[0.3, -1.2, 2.0]] * bg_rois, dtype=torch.float64)
    fg_logits = torch.cat([fg, torch.full((len(probs), 1), 1.7, dtype=torch.float64)], dim=1)
    bg_logits = torch.cat([bg, torch.full((bg_rois, 1), 4.0, dtype=torch.float64)], dim=1)
    logits = torch.cat([fg_logits, bg_logits]).float()
    labels = torch.tensor(list(labels) + [num_classes] * bg_rois)
    return logits, labels


def test_example_a_ema_from_zeros():
    num_classes = 3
    matrix, seen = _buffers(num_classes)

    # Batch 1, with one background RoI that the caller excludes before the statistics.
    logits, labels = _logits_from_probs(*EX_A_BATCH1, bg_rois=1, num_classes=num_classes)
    probs, fg_labels = _fg_probs(logits, labels, num_classes)
    assert probs.shape == (3, 3)
    _close(probs, EX_A_BATCH1[0], atol=1e-6)
    stats = pcb_batch_statistics(probs, fg_labels)
    _close(stats[:, 3], [2, 1, 0], atol=0)
    _update(matrix, seen, probs, fg_labels, momentum=0.99)
    _close(matrix, [[0.6, 0.25, 0.15], [0.1, 0.8, 0.1], [0, 0, 0]], atol=1e-6)
    assert torch.equal(seen, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    assert matrix.dtype == torch.float32 and seen.dtype == torch.float64

    # Batch 2: the probabilities given directly, as the caller hands them over.
    row1_before = matrix[1].clone()
    _update(matrix, seen, torch.tensor(EX_A_BATCH2[0]), torch.tensor(EX_A_BATCH2[1]))
    _close(matrix[0], [0.596, 0.2535, 0.1505], atol=1e-6)
    assert torch.equal(matrix[1], row1_before)
    _close(matrix[2], [0.3, 0.3, 0.4], atol=1e-6)
    assert torch.equal(seen, torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64))
    _close(matrix.sum(0), [0.996, 1.3535, 0.6505], atol=1e-6)

    # Row k of the targets for labels 0..C-1 is column k of M_hat.
    m_hat_cols = pcb_fightback_targets(matrix, torch.arange(num_classes))
    m_hat = [
        [0.598394, 0.187292, 0.231360],
        [0.100402, 0.591060, 0.153728],
        [0.301205, 0.221648, 0.614912],
    ]
    _close(m_hat_cols.t(), m_hat, atol=2e-6)

    t1 = pcb_fightback_targets(matrix, torch.tensor([1]))
    _close(t1[0], [0.187292, 0.591060, 0.221648], atol=2e-6)

    labels = torch.tensor([1, 2, 3])
    t = pcb_fightback_targets(matrix, labels[labels < num_classes])
    q = pcb_mixed_targets(labels, t, 0.4, num_classes)
    _close(q[0], [0.074917, 0.836424, 0.088659, 0.0], atol=2e-6)
    assert torch.equal(q[2], torch.tensor([0.0, 0.0, 0.0, 1.0]))

    z = torch.tensor([[2, 0.5, -1, 0], [0, 1, 0, 0.5], [0.1, 0.2, 0.3, 2]])
    _close(soft_cross_entropy(z, q), 1.352144, atol=2e-6)
    _close(F.cross_entropy(z, labels), 1.365770, atol=2e-6)
    # And the independent decomposition (1/N)[CE_bg + (1-a) CE_fg + a H_fg] on the same M.
    expected = _ref_decomposed_loss(z.tolist(), labels.tolist(), matrix.double().tolist(), 0.4)
    _close(soft_cross_entropy(z, q), expected, atol=1e-6)


EX_B_M = [[0.6, 0.4], [0.1, 0.9]]
EX_B_LOGITS = [[1, 2, 0.5], [0.2, 1.5, -0.3], [0, 0, 2]]


def test_example_b_fightback():
    matrix = torch.tensor(EX_B_M)
    m_hat = pcb_fightback_targets(matrix, torch.tensor([0, 1])).t()
    _close(m_hat, [[0.857143, 0.307692], [0.142857, 0.692308]], atol=1e-6)
    # A head sample (y = 1) is pushed toward the tail class 0.
    _close(pcb_fightback_targets(matrix, torch.tensor([1]))[0], [0.3077, 0.6923], atol=1e-4)

    labels = torch.tensor([0, 1, 2])
    t = pcb_fightback_targets(matrix, labels[:2])
    q = pcb_mixed_targets(labels, t, 0.4, 2)
    _close(q, [[0.942857, 0.057143, 0], [0.123077, 0.876923, 0], [0, 0, 1]], atol=1e-6)

    for alpha, expected in ((0.0, 0.689016), (0.2, 0.706159), (0.4, 0.723302)):
        z = torch.tensor(EX_B_LOGITS, requires_grad=True)
        q = pcb_mixed_targets(labels, t, alpha, 2)
        loss = soft_cross_entropy(z, q)
        _close(loss, expected, atol=1e-6)
        loss.backward()
        _close(z.grad, (torch.softmax(z.detach(), 1) - q) / 3, atol=1e-7)
    _close(F.cross_entropy(torch.tensor(EX_B_LOGITS), labels), 0.689016, atol=1e-6)
    assert pairwise_bias(matrix) == pytest.approx(0.424264, abs=1e-6)


def test_example_c_eqlv2_targets():
    matrix = torch.tensor([[0.6, 0.05], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 2])
    t = pcb_fightback_targets(matrix, labels[:2], normalize_columns=False)
    assert torch.equal(t, torch.tensor([[0.6, 0.3], [0.05, 0.7]]))  # raw columns, not normalised
    q = pcb_mixed_targets(labels, t, 0.2, 2)
    _close(q[0], [0.92, 0.06, 0.0], atol=1e-7)
    _close(q[1], [0.01, 0.94, 0.0], atol=1e-7)
    # EQL v2's objectness column keeps target 0 on fg RoIs and 1 on bg RoIs.
    assert torch.equal(q[2], torch.tensor([0.0, 0.0, 1.0]))


def test_schedule():
    assert pcb_step_alphas(0.4, 3) == pytest.approx((0.0, 0.2, 0.4), abs=1e-15)
    assert pcb_step_alphas(0.05, 3) == pytest.approx((0.0, 0.025, 0.05), abs=1e-15)
    assert pcb_step_alphas(0.2, 3) == pytest.approx((0.0, 0.1, 0.2), abs=1e-15)
    assert pcb_step_alphas(0.4, 1) == (0.4,)  # PCB-only ablation, not runnable in the reference
    five = pcb_step_alphas(0.3, 5)
    assert len(five) == 5 and five[0] == 0.0 and five[-1] == 0.3
    _close(five, [0.3 * r / 4 for r in range(5)], atol=1e-15)
    assert all(isinstance(a, float) for a in five)
    assert pcb_step_alphas(0, 3) == (0.0, 0.0, 0.0)
    assert pcb_step_alphas(1, 2) == (0.0, 1.0)


def test_three_updates_per_iteration_decay():
    # Without re-normalisation (EQL v2) a filled row decays by 0.99^3 = 0.970299 per iteration of
    # three loss calls, toward the constant batch mean.
    matrix = torch.tensor([[0.9, 0.2], [0.4, 0.5]], dtype=torch.float64)
    seen = torch.ones(2, dtype=torch.float64)
    probs = torch.tensor([[0.1, 0.3]], dtype=torch.float64)
    for _ in range(3):
        _update(matrix, seen, probs, torch.tensor([0]), renormalize_rows=False)
    assert 0.99**3 == pytest.approx(0.970299, abs=1e-12)
    expected = [0.970299 * m + (1 - 0.970299) * p for m, p in zip([0.9, 0.2], [0.1, 0.3])]
    _close(matrix[0], expected, atol=1e-12)
    _close(matrix[1], [0.4, 0.5], atol=0)


# ---------------------------------------------------------------- statistics and EMA


def test_statistics_match_loop_reference():
    gen = torch.Generator().manual_seed(0)
    num_classes = 7
    probs = _random_probs(gen, 40, num_classes)
    labels = torch.randint(0, num_classes, (40,), generator=gen)
    stats = pcb_batch_statistics(probs, labels)
    assert stats.shape == (num_classes, num_classes + 1) and stats.dtype == torch.float64
    sums, counts = _ref_statistics(probs.double().tolist(), labels.tolist(), num_classes)
    _close(stats[:, :num_classes], sums, atol=1e-12)
    _close(stats[:, num_classes], counts, atol=0)
    # Any integer label dtype works.
    assert torch.equal(pcb_batch_statistics(probs, labels.int()), stats)


def test_ema_matches_loop_reference():
    gen = torch.Generator().manual_seed(1)
    num_classes = 6
    for renormalize, momentum in ((True, 0.99), (True, 0.9), (False, 0.99), (False, 0.5)):
        matrix, seen = _buffers(num_classes)
        ref = [[0.0] * num_classes for _ in range(num_classes)]
        for _ in range(8):
            rows = int(torch.randint(0, 12, (1,), generator=gen))
            z = torch.randn(rows, num_classes, generator=gen) * 2
            probs = torch.softmax(z, 1) if renormalize else torch.sigmoid(z)
            labels = torch.randint(0, num_classes - 1, (rows,), generator=gen)  # last never seen
            _update(matrix, seen, probs, labels, momentum=momentum, renormalize_rows=renormalize)
            ref = _ref_ema(ref, probs.double().tolist(), labels.tolist(), momentum, renormalize)
        _close(matrix, ref, atol=2e-7)
        assert bool((matrix[-1] == 0).all()) and seen[-1] == 0


def test_rows_are_distributions_after_any_update():
    # Invariant 1.
    gen = torch.Generator().manual_seed(2)
    num_classes = 9
    matrix, seen = _buffers(num_classes)
    for _ in range(50):
        rows = int(torch.randint(0, 20, (1,), generator=gen))
        labels = torch.randint(0, num_classes - 2, (rows,), generator=gen)  # classes 7, 8 unseen
        _update(matrix, seen, _random_probs(gen, rows, num_classes), labels)
        seen_rows = seen > 0
        _close(matrix[seen_rows].sum(1), torch.ones(int(seen_rows.sum())), atol=1e-6)
        assert bool(((matrix >= 0) & (matrix <= 1)).all())
        assert bool((matrix[~seen_rows] == 0).all())
    assert seen[-2:].tolist() == [0.0, 0.0]


def test_absent_rows_are_bit_identical_and_bg_only_batches_change_nothing():
    # Invariant 2.
    gen = torch.Generator().manual_seed(3)
    num_classes = 5
    matrix, seen = _buffers(num_classes)
    _update(matrix, seen, _random_probs(gen, 30, num_classes), torch.arange(30) % num_classes)
    # Leave some rounding garbage in the absent rows so that "identical" means bit-identical.
    matrix[3] = matrix[3] * (1 + 1e-7)
    before, seen_before = matrix.clone(), seen.clone()
    _update(matrix, seen, _random_probs(gen, 4, num_classes), torch.tensor([0, 2, 0, 2]))
    for i in (1, 3, 4):
        assert torch.equal(matrix[i], before[i])
    assert not torch.equal(matrix[0], before[0]) and not torch.equal(matrix[2], before[2])
    assert seen.tolist() == [s + d for s, d in zip(seen_before.tolist(), [2, 0, 2, 0, 0])]

    # A bg-only batch: the caller selects zero fg rows; the statistics are zeros and the update
    # (which the caller still runs, after its all-reduce) leaves everything bit-identical.
    before, seen_before = matrix.clone(), seen.clone()
    logits = torch.randn(6, num_classes + 1, generator=gen)
    probs, fg_labels = _fg_probs(logits, torch.full((6,), num_classes), num_classes)
    stats = pcb_batch_statistics(probs, fg_labels)
    assert torch.equal(stats, torch.zeros(num_classes, num_classes + 1, dtype=torch.float64))
    pcb_ema_update(matrix, seen, stats)
    assert torch.equal(matrix, before) and torch.equal(seen, seen_before)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99, 0.999])
def test_first_update_of_a_zero_row_is_the_batch_mean(momentum):
    # Invariant 3: with re-normalisation there is no zero-init bias, whatever the momentum.
    gen = torch.Generator().manual_seed(4)
    num_classes = 4
    probs = _random_probs(gen, 7, num_classes)
    labels = torch.tensor([0, 0, 0, 2, 2, 1, 0])
    matrix, seen = _buffers(num_classes)
    _update(matrix, seen, probs, labels, momentum=momentum)
    for i in range(3):
        _close(matrix[i], probs[labels == i].double().mean(0), atol=1e-7)
    assert bool((matrix[3] == 0).all())
    # EQL v2 keeps the zero-init bias: (1 - m) * mean.
    matrix, seen = _buffers(num_classes)
    sig = torch.sigmoid(torch.randn(7, num_classes, generator=gen))
    _update(matrix, seen, sig, labels, momentum=momentum, renormalize_rows=False)
    _close(matrix[0], (1 - momentum) * sig[labels == 0].double().mean(0), atol=1e-7)


def test_ema_is_float64_and_keeps_the_buffer_dtypes():
    # Many updates with a constant mean converge to it; the float32 buffer is rounded once per
    # update from a float64 EMA, so there is no drift away from a distribution.
    num_classes = 3
    matrix, seen = _buffers(num_classes)
    probs = torch.tensor([[0.2, 0.5, 0.3]])
    for _ in range(500):
        _update(matrix, seen, probs, torch.tensor([1]))
    assert matrix.dtype == torch.float32 and seen.dtype == torch.float64
    _close(matrix[1], [0.2, 0.5, 0.3], atol=1e-7)
    assert seen.tolist() == [0.0, 500.0, 0.0]


def test_two_ranks_summed_equal_one_process():
    # Invariant 8: all-reduce(SUM) of [S | n] from two ranks == one process on the whole batch.
    gen = torch.Generator().manual_seed(5)
    num_classes = 4
    probs_a, probs_b = _random_probs(gen, 5, num_classes), _random_probs(gen, 2, num_classes)
    labels_a = torch.tensor([0, 0, 0, 0, 1])  # counts differ between ranks for class 0
    labels_b = torch.tensor([0, 1])
    start = torch.softmax(torch.randn(num_classes, num_classes, generator=gen), 1)

    m_two, seen_two = start.clone(), torch.ones(num_classes, dtype=torch.float64)
    reduced = pcb_batch_statistics(probs_a, labels_a) + pcb_batch_statistics(probs_b, labels_b)
    pcb_ema_update(m_two, seen_two, reduced)

    m_one, seen_one = start.clone(), torch.ones(num_classes, dtype=torch.float64)
    _update(m_one, seen_one, torch.cat([probs_a, probs_b]), torch.cat([labels_a, labels_b]))
    _close(m_two, m_one, atol=1e-7)
    assert torch.equal(seen_two, seen_one)

    # Averaging the per-rank means instead is wrong when the counts differ.
    m_avg = start.clone()
    mean_a = probs_a[labels_a == 0].double().mean(0)
    mean_b = probs_b[labels_b == 0].double().mean(0)
    row = 0.99 * m_avg[0].double() + 0.01 * (mean_a + mean_b) / 2
    row = row / row.sum()
    assert float((row - m_one[0].double()).abs().max()) > 1e-4


# ---------------------------------------------------------------- targets and loss


def test_target_and_mixed_label_sums():
    # Invariant 4.
    gen = torch.Generator().manual_seed(6)
    num_classes = 6
    matrix, seen = _buffers(num_classes)
    for _ in range(5):
        _update(matrix, seen, _random_probs(gen, 30, num_classes), torch.arange(30) % num_classes)
    cols = pcb_fightback_targets(matrix, torch.arange(num_classes))  # row k = column k of M_hat
    _close(cols.sum(1), torch.ones(num_classes), atol=1e-6)
    assert bool((cols >= 0).all())
    # Independent column normalisation.
    m = matrix.double()
    _close(cols.t(), m / m.sum(0, keepdim=True), atol=1e-7)

    labels = torch.tensor([6, 2, 0, 6, 5, 2, 6])
    fg = labels < num_classes
    t = pcb_fightback_targets(matrix, labels[fg])
    assert t.shape == (4, num_classes) and t.dtype == torch.float32
    assert not t.requires_grad
    _close(t, cols[labels[fg]], atol=0)
    q = pcb_mixed_targets(labels, t, 0.4, num_classes)
    assert q.shape == (7, num_classes + 1) and q.dtype == torch.float32
    _close(q.sum(1), torch.ones(7), atol=1e-6)
    assert bool((q[fg, num_classes] == 0).all())
    assert torch.equal(q[~fg], F.one_hot(labels[~fg], num_classes + 1).float())
    _close(q[fg, :num_classes], 0.6 * F.one_hot(labels[fg], num_classes).float() + 0.4 * t, atol=0)


def test_identity_matrix_gives_one_hot_targets_and_plain_ce():
    # Invariant 5.
    gen = torch.Generator().manual_seed(7)
    num_classes = 5
    eye = torch.eye(num_classes)
    labels = torch.tensor([0, 5, 3, 4, 5, 1, 1])
    fg = labels < num_classes
    t = pcb_fightback_targets(eye, labels[fg])
    assert torch.equal(t, F.one_hot(labels[fg], num_classes).float())
    z = torch.randn(7, num_classes + 1, generator=gen) * 3
    ce = F.cross_entropy(z, labels)
    for alpha in (0.0, 0.05, 0.2, 0.4, 0.7, 1.0):
        q = pcb_mixed_targets(labels, t, alpha, num_classes)
        assert torch.equal(q, F.one_hot(labels, num_classes + 1).float())
        _close(soft_cross_entropy(z, q), ce, atol=1e-6)


def test_alpha_zero_is_plain_ce():
    # Invariant 6: whatever M holds, a = 0 gives exactly the one-hot labels, so the loss is the
    # base CE. The label is bit-identical; the loss value only to rounding, because torch's
    # cross_entropy reduces the per-RoI terms in a different order (documented in the module;
    # the caller runs the base loss itself when the gate is closed).
    gen = torch.Generator().manual_seed(8)
    num_classes = 4
    matrix = torch.rand(num_classes, num_classes, generator=gen)
    labels = torch.tensor([3, 4, 0, 4, 1, 2, 2])
    t = pcb_fightback_targets(matrix, labels[labels < num_classes])
    q = pcb_mixed_targets(labels, t, 0.0, num_classes)
    assert torch.equal(q, F.one_hot(labels, num_classes + 1).float())
    z = (torch.randn(7, num_classes + 1, generator=gen) * 2).requires_grad_()
    z_ref = z.detach().clone().requires_grad_()
    loss = soft_cross_entropy(z, q)
    ref = F.cross_entropy(z_ref, labels)
    _close(loss, ref, atol=0, rtol=1e-6)
    loss.backward()
    ref.backward()
    _close(z.grad, z_ref.grad, atol=1e-8)
    # Larger random batches: still within a few float32 ulps.
    for seed in range(5):
        g = torch.Generator().manual_seed(100 + seed)
        big_z = torch.randn(512, 31, generator=g) * 4
        big_y = torch.randint(0, 31, (512,), generator=g)
        q = pcb_mixed_targets(big_y, torch.rand(int((big_y < 30).sum()), 30), 0.0, 30)
        _close(soft_cross_entropy(big_z, q), F.cross_entropy(big_z, big_y), atol=0, rtol=1e-6)


def test_loss_matches_decomposition_and_gradient_is_residual():
    # Invariant 7 on random data, with unequal numbers of fg and bg RoIs.
    gen = torch.Generator().manual_seed(9)
    num_classes = 6
    matrix = torch.softmax(torch.randn(num_classes, num_classes, generator=gen) * 2, 1)
    labels = torch.tensor([0, 6, 2, 5, 6, 6, 1, 2, 4, 3, 6])
    fg = labels < num_classes
    t = pcb_fightback_targets(matrix, labels[fg])
    for alpha in (0.0, 0.2, 0.4, 1.0):
        z = torch.randn(11, num_classes + 1, generator=gen, dtype=torch.float64) * 2
        z.requires_grad_()
        q = pcb_mixed_targets(labels, t, alpha, num_classes)
        loss = soft_cross_entropy(z, q)
        assert loss.dtype == torch.float64
        expected = _ref_decomposed_loss(
            z.detach().tolist(), labels.tolist(), matrix.double().tolist(), alpha
        )
        _close(loss, expected, atol=1e-6)
        loss.backward()
        _close(z.grad, (torch.softmax(z.detach(), 1) - q.double()) / 11, atol=1e-7)


def test_no_gradient_reaches_the_buffers():
    # Invariant 7 (second half) and spec §8: no graph is chained through the buffers.
    gen = torch.Generator().manual_seed(10)
    num_classes = 4
    matrix, seen = _buffers(num_classes)
    weight = torch.randn(8, num_classes + 1, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 4, 2])
    for step in range(3):
        z = weight * (step + 1)  # a non-leaf with a graph, like the head's logits
        probs, fg_labels = _fg_probs(z, labels, num_classes)
        stats = pcb_batch_statistics(probs, fg_labels)
        assert not stats.requires_grad and stats.grad_fn is None
        pcb_ema_update(matrix, seen, stats)
        assert not matrix.requires_grad and matrix.grad_fn is None
        assert not seen.requires_grad and seen.grad_fn is None
        t = pcb_fightback_targets(matrix, fg_labels)
        q = pcb_mixed_targets(labels, t, 0.4, num_classes)
        assert not t.requires_grad and not q.requires_grad
        loss = soft_cross_entropy(z, q)
        loss.backward()  # frees this step's graph; nothing of it survives in the buffers
    assert matrix.grad is None
    # Statistics that do carry a graph (e.g. built by hand) are detached by the update.
    tracked = torch.rand(num_classes, num_classes + 1, dtype=torch.float64, requires_grad=True)
    pcb_ema_update(matrix, seen, tracked * 1.0)
    assert not matrix.requires_grad and matrix.grad_fn is None and not seen.requires_grad
    # The targets are detached even from a matrix that requires grad.
    assert not pcb_fightback_targets(matrix.clone().requires_grad_(), fg_labels).requires_grad


def test_gating_rules():
    # Invariant 9.
    all_seen = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    one_unseen = torch.tensor([3.0, 0.0, 2.0], dtype=torch.float64)
    assert pcb_active(100, 100, all_seen) is True
    assert pcb_active(250, 100, all_seen) is True
    assert pcb_active(99, 100, all_seen) is False
    assert pcb_active(0, 0, all_seen) is True
    assert pcb_active(100, 100, one_unseen) is False
    assert pcb_active(10**6, 100, one_unseen) is False
    assert pcb_active(100, 100, one_unseen, require_all_seen=False) is True
    assert pcb_active(99, 100, one_unseen, require_all_seen=False) is False
    assert pcb_active(5, 0, torch.zeros(3)) is False
    # The counter the EMA maintains opens the gate once every class has been seen.
    matrix, seen = _buffers(3)
    _update(matrix, seen, torch.full((2, 3), 1 / 3), torch.tensor([0, 1]))
    assert pcb_active(10, 0, seen) is False
    _update(matrix, seen, torch.full((1, 3), 1 / 3), torch.tensor([2]))
    assert pcb_active(10, 0, seen) is True


class _Holder(torch.nn.Module):
    """Stand-in for the box predictor that owns the PCB buffers."""

    def __init__(self, num_classes):
        super().__init__()
        self.register_buffer("pcb_cm", torch.zeros(num_classes, num_classes))
        self.register_buffer("pcb_seen", torch.zeros(num_classes, dtype=torch.float64))


def test_state_dict_round_trip():
    # Invariant 10: M and seen survive save / load exactly, and the next update is identical.
    gen = torch.Generator().manual_seed(11)
    num_classes = 5
    src = _Holder(num_classes)
    for _ in range(4):
        _update(
            src.pcb_cm,
            src.pcb_seen,
            _random_probs(gen, 9, num_classes),
            torch.randint(0, num_classes, (9,), generator=gen),
        )
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = _Holder(num_classes)
    dst.load_state_dict(torch.load(buf))
    assert torch.equal(dst.pcb_cm, src.pcb_cm) and torch.equal(dst.pcb_seen, src.pcb_seen)
    probs = _random_probs(gen, 6, num_classes)
    labels = torch.randint(0, num_classes, (6,), generator=gen)
    for holder in (src, dst):
        _update(holder.pcb_cm, holder.pcb_seen, probs, labels)
    assert torch.equal(dst.pcb_cm, src.pcb_cm) and torch.equal(dst.pcb_seen, src.pcb_seen)


def test_pairwise_bias():
    assert pairwise_bias(torch.eye(4)) == 0.0
    sym = torch.tensor([[0.5, 0.2], [0.2, 0.8]])
    assert pairwise_bias(sym) == 0.0
    gen = torch.Generator().manual_seed(12)
    m = torch.rand(5, 5, generator=gen)
    expected = math.sqrt(
        sum((m[i, j].item() - m[j, i].item()) ** 2 for i in range(5) for j in range(5))
    )
    assert pairwise_bias(m) == pytest.approx(expected, abs=1e-6)
    assert isinstance(pairwise_bias(m), float)


# ---------------------------------------------------------------- edge cases


def test_empty_batches():
    num_classes = 4
    stats = pcb_batch_statistics(torch.zeros(0, num_classes), torch.zeros(0, dtype=torch.long))
    assert stats.shape == (4, 5) and stats.dtype == torch.float64 and not bool(stats.any())
    matrix = torch.softmax(torch.randn(4, 4), 1)
    t = pcb_fightback_targets(matrix, torch.zeros(0, dtype=torch.long))
    assert t.shape == (0, num_classes)
    q = pcb_mixed_targets(torch.zeros(0, dtype=torch.long), t, 0.4, num_classes)
    assert q.shape == (0, num_classes + 1) and q.dtype == torch.float32
    z = torch.zeros(0, num_classes + 1, requires_grad=True)
    loss = soft_cross_entropy(z, q)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert z.grad is not None and z.grad.shape == (0, num_classes + 1)
    # All-background RoIs: no fightback rows, plain CE on the background label.
    labels = torch.full((3,), num_classes)
    q = pcb_mixed_targets(labels, t, 0.4, num_classes)
    z = torch.randn(3, num_classes + 1, requires_grad=True)
    loss = soft_cross_entropy(z, q)
    _close(loss, F.cross_entropy(z.detach(), labels), atol=1e-6)
    loss.backward()
    assert bool(torch.isfinite(z.grad).all())


def test_unseen_classes_give_finite_targets():
    # A class never seen has a zero row; with the gate forced open, a class that no row has mass
    # on has a zero column: its target is all zeros instead of NaN (eps clamp).
    num_classes = 3
    matrix, seen = _buffers(num_classes)
    _update(matrix, seen, torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]]), torch.tensor([0, 1]))
    assert seen.tolist() == [1.0, 1.0, 0.0]
    assert pcb_active(1, 0, seen) is False and pcb_active(1, 0, seen, require_all_seen=False)
    t = pcb_fightback_targets(matrix, torch.tensor([0, 1, 2]))
    assert bool(torch.isfinite(t).all())
    _close(t[0], [0.5 / 0.7, 0.2 / 0.7, 0.0], atol=1e-6)  # the unseen row only removes mass
    assert torch.equal(t[2], torch.zeros(3))
    q = pcb_mixed_targets(torch.tensor([2, 0]), t[[2, 0]], 0.4, num_classes)
    _close(q[0], [0.0, 0.0, 0.6, 0.0], atol=1e-7)  # the zero column only removes mass too
    z = torch.randn(2, num_classes + 1, requires_grad=True)
    loss = soft_cross_entropy(z, q)
    loss.backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(z.grad).all())
    # All-zero matrix (nothing seen at all) with the gate forced open: zero targets, finite.
    assert torch.equal(
        pcb_fightback_targets(torch.zeros(3, 3), torch.tensor([1])), torch.zeros(1, 3)
    )
    raw = pcb_fightback_targets(matrix, torch.tensor([2]), normalize_columns=False)
    assert torch.equal(raw, torch.zeros(1, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(13)
    num_classes = 5
    logits = torch.randn(12, num_classes + 1, generator=gen) * 3
    labels = torch.tensor([0, 1, 5, 2, 3, 4, 5, 0, 0, 1, 5, 4])
    half = logits.to(dtype)
    probs, fg_labels = _fg_probs(half, labels, num_classes)
    assert probs.dtype == dtype
    stats = pcb_batch_statistics(probs, fg_labels)
    assert stats.dtype == torch.float64
    _close(stats, pcb_batch_statistics(probs.double(), fg_labels), atol=0)
    matrix, seen = _buffers(num_classes)
    pcb_ema_update(matrix, seen, stats)
    assert matrix.dtype == torch.float32
    t = pcb_fightback_targets(matrix, fg_labels)
    q = pcb_mixed_targets(labels, t, 0.4, num_classes)
    z = half.clone().requires_grad_()
    loss = soft_cross_entropy(z, q)
    assert loss.dtype == torch.float32
    _close(loss, soft_cross_entropy(half.float(), q), atol=0)
    loss.backward()
    assert z.grad.dtype == dtype and bool(torch.isfinite(z.grad.float()).all())
    # Half-precision targets are upcast too.
    _close(
        soft_cross_entropy(half, q.to(dtype)),
        soft_cross_entropy(half.float(), q.to(dtype).float()),
        atol=0,
    )


def test_float64_matrix_is_supported():
    matrix = torch.tensor(EX_B_M, dtype=torch.float64)
    t = pcb_fightback_targets(matrix, torch.tensor([1]))
    assert t.dtype == torch.float64
    _close(t[0], [0.4 / 1.3, 0.9 / 1.3], atol=1e-15)
    seen = torch.zeros(2, dtype=torch.float64)
    pcb_ema_update(
        matrix, seen, pcb_batch_statistics(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))
    )
    assert matrix.dtype == torch.float64
    _close(matrix[0], [0.599, 0.401], atol=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(14)
    num_classes = 7
    matrix, seen = _buffers(num_classes)
    matrix_c, seen_c = matrix.cuda(), seen.cuda()
    for _ in range(4):
        probs = _random_probs(gen, 20, num_classes)
        labels = torch.randint(0, num_classes, (20,), generator=gen)
        _update(matrix, seen, probs, labels)
        stats = pcb_batch_statistics(probs.cuda(), labels.cuda())
        assert stats.device.type == "cuda"
        pcb_ema_update(matrix_c, seen_c, stats)
    _close(matrix_c.cpu(), matrix, atol=1e-7)
    assert torch.equal(seen_c.cpu(), seen)
    labels = torch.tensor([0, 7, 3, 6, 7])
    fg = labels < num_classes
    t = pcb_fightback_targets(matrix_c, labels[fg].cuda())
    assert t.device.type == "cuda"
    q = pcb_mixed_targets(labels.cuda(), t, 0.4, num_classes)
    z = torch.randn(5, num_classes + 1, generator=gen)
    loss = soft_cross_entropy(z.cuda().half(), q)
    q_cpu = pcb_mixed_targets(labels, pcb_fightback_targets(matrix, labels[fg]), 0.4, num_classes)
    _close(loss.cpu(), soft_cross_entropy(z.half(), q_cpu), atol=1e-5)


def test_many_classes_random_consistency():
    # A larger random case: the pipeline keeps every invariant with C = 50 and sparse labels.
    rng = random.Random(15)
    gen = torch.Generator().manual_seed(15)
    num_classes = 50
    matrix, seen = _buffers(num_classes)
    for _ in range(20):
        labels = torch.tensor([rng.randrange(num_classes + 1) for _ in range(64)])
        logits = torch.randn(64, num_classes + 1, generator=gen) * 3
        probs, fg_labels = _fg_probs(logits, labels, num_classes)
        _update(matrix, seen, probs, fg_labels)
    assert pcb_active(0, 0, seen) == bool((seen > 0).all())
    seen_rows = seen > 0
    _close(matrix[seen_rows].sum(1), torch.ones(int(seen_rows.sum())), atol=1e-6)
    t = pcb_fightback_targets(matrix, fg_labels)
    _close(t.sum(1), torch.ones(len(fg_labels)), atol=1e-5)
    q = pcb_mixed_targets(labels, t, 0.4, num_classes)
    _close(q.sum(1), torch.ones(64), atol=1e-5)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (torch.rand(3), torch.zeros(3, dtype=torch.long), r"\(N, C\)"),
        ([[0.5, 0.5]], torch.zeros(1, dtype=torch.long), r"\(N, C\)"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), "float"),
        (torch.zeros(2, 0), torch.zeros(2, dtype=torch.long), "C >= 1"),
        (torch.rand(2, 3), torch.zeros(3, dtype=torch.long), r"\(2,\) integer"),
        (torch.rand(2, 3), torch.zeros(2), r"\(2,\) integer"),
        (torch.rand(2, 3), torch.tensor([True, False]), r"\(2,\) integer"),
        (torch.rand(2, 3), torch.tensor([0, 3]), r"\[0, 3\)"),
        (torch.rand(2, 3), torch.tensor([-1, 0]), r"\[0, 3\)"),
        (torch.randn(2, 3) * 5, torch.tensor([0, 1]), r"\[0, 1\]"),
        (torch.tensor([[0.5, float("nan"), 0.5]]), torch.tensor([0]), "NaN"),
    ],
)
def test_bad_statistics_inputs_raise(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        pcb_batch_statistics(probs, labels)


def _stats(c=3):
    return torch.zeros(c, c + 1, dtype=torch.float64)


@pytest.mark.parametrize(
    "matrix, seen, stats, kwargs, match",
    [
        (torch.zeros(3, 4), torch.zeros(3), _stats(), {}, "square"),
        (torch.zeros(0, 0), torch.zeros(0), _stats(0), {}, "non-empty"),
        (torch.zeros(3, 3, dtype=torch.long), torch.zeros(3), _stats(), {}, "float"),
        (torch.zeros(3, 3), torch.zeros(4), _stats(), {}, "seen"),
        (torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), _stats(), {}, "seen"),
        (torch.zeros(3, 3), torch.zeros(3), _stats(4), {}, "statistics"),
        (torch.zeros(3, 3), torch.zeros(3), torch.zeros(3, 3), {}, "statistics"),
        (torch.zeros(3, 3), torch.zeros(3), -torch.ones(3, 4), {}, "finite and >= 0"),
        (torch.zeros(3, 3), torch.zeros(3), torch.full((3, 4), float("nan")), {}, "finite"),
        (torch.zeros(3, 3), torch.zeros(3), _stats(), {"momentum": 1.0}, "momentum"),
        (torch.zeros(3, 3), torch.zeros(3), _stats(), {"momentum": -0.1}, "momentum"),
        (torch.zeros(3, 3), torch.zeros(3), _stats(), {"momentum": float("nan")}, "momentum"),
        (torch.zeros(3, 3), torch.zeros(3), _stats(), {"momentum": "0.9"}, "momentum"),
    ],
)
def test_bad_ema_inputs_raise(matrix, seen, stats, kwargs, match):
    before = matrix.clone()
    with pytest.raises(ValueError, match=match):
        pcb_ema_update(matrix, seen, stats, **kwargs)
    assert torch.equal(matrix, before)  # nothing written on failure


@pytest.mark.parametrize(
    "matrix, labels, kwargs, match",
    [
        (torch.zeros(3, 2), torch.tensor([0]), {}, "square"),
        (torch.zeros(3), torch.tensor([0]), {}, "square"),
        (torch.zeros(3, 3), torch.tensor([3]), {}, r"\[0, 3\)"),
        (torch.zeros(3, 3), torch.tensor([-1]), {}, r"\[0, 3\)"),
        (torch.zeros(3, 3), torch.tensor([[0]]), {}, "1-D"),
        (torch.zeros(3, 3), torch.tensor([0.0]), {}, "integer"),
        (torch.zeros(3, 3), torch.tensor([0]), {"eps": 0.0}, "eps"),
        (torch.zeros(3, 3), torch.tensor([0]), {"eps": float("inf")}, "eps"),
    ],
)
def test_bad_target_inputs_raise(matrix, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pcb_fightback_targets(matrix, labels, **kwargs)


@pytest.mark.parametrize(
    "labels, fightback, alpha, num_classes, match",
    [
        (torch.tensor([0, 3]), torch.zeros(1, 3), 1.5, 3, "alpha"),
        (torch.tensor([0, 3]), torch.zeros(1, 3), -0.1, 3, "alpha"),
        (torch.tensor([0, 3]), torch.zeros(1, 3), float("nan"), 3, "alpha"),
        (torch.tensor([0, 3]), torch.zeros(1, 3), True, 3, "alpha"),
        (torch.tensor([0, 3]), torch.zeros(2, 3), 0.4, 3, r"\(1, 3\)"),
        (torch.tensor([0, 3]), torch.zeros(1, 4), 0.4, 3, r"\(1, 3\)"),
        (torch.tensor([0, 4]), torch.zeros(1, 3), 0.4, 3, r"\[0, 4\)"),
        (torch.tensor([[0, 3]]), torch.zeros(1, 3), 0.4, 3, "1-D"),
        (torch.tensor([0, 3]), torch.zeros(1, 3, dtype=torch.long), 0.4, 3, "float"),
        (torch.tensor([0, 3]), torch.zeros(1, 3), 0.4, 0, "num_classes"),
        (torch.tensor([0, 3]), torch.zeros(1, 3), 0.4, 3.0, "num_classes"),
    ],
)
def test_bad_mixed_target_inputs_raise(labels, fightback, alpha, num_classes, match):
    with pytest.raises(ValueError, match=match):
        pcb_mixed_targets(labels, fightback, alpha, num_classes)


@pytest.mark.parametrize(
    "logits, targets, match",
    [
        (torch.zeros(3), torch.zeros(3), r"\(R, K\)"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), "float"),
        (torch.zeros(2, 3), torch.zeros(2, 4), "shape"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), "float"),
        (torch.zeros(2, 3), torch.full((2, 3), -0.5), "finite and >= 0"),
        (torch.zeros(2, 3), torch.full((2, 3), float("nan")), "finite and >= 0"),
    ],
)
def test_bad_loss_inputs_raise(logits, targets, match):
    with pytest.raises(ValueError, match=match):
        soft_cross_entropy(logits, targets)


@pytest.mark.parametrize(
    "alpha, steps, match",
    [
        (1.2, 3, "alpha"),
        (-0.1, 3, "alpha"),
        (0.4, 0, "num_steps"),
        (0.4, 2.0, "num_steps"),
        (0.4, True, "num_steps"),
        ("0.4", 3, "alpha"),
    ],
)
def test_bad_schedule_inputs_raise(alpha, steps, match):
    with pytest.raises(ValueError, match=match):
        pcb_step_alphas(alpha, steps)


@pytest.mark.parametrize(
    "args, match",
    [
        ((1.5, 0, torch.ones(3)), "iteration"),
        ((1, None, torch.ones(3)), "start_iter"),
        ((True, 0, torch.ones(3)), "iteration"),
        ((1, 0, torch.ones(2, 2)), "seen"),
        ((1, 0, torch.ones(0)), "seen"),
        ((1, 0, [1.0, 1.0]), "seen"),
    ],
)
def test_bad_gate_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        pcb_active(*args)


@pytest.mark.parametrize(
    "matrix", [torch.zeros(2, 3), torch.zeros(4), torch.zeros(2, 2, dtype=torch.long)]
)
def test_bad_pairwise_bias_inputs_raise(matrix):
    with pytest.raises(ValueError, match="PCB matrix"):
        pairwise_bias(matrix)
