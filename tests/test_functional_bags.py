"""Tests of longtail/functional/bags.py: BAGS partition, logit layout, sampling, loss and scores.

Expected numbers are either pinned from the worked examples of the BAGS spec (§6) or computed here
independently with plain Python ``math`` in float64 (the reference layout below is rebuilt from the
counts without the module under test); none are produced by the module under test.
"""

import json
import math
import os
import random

import pytest
import torch

from longtail.functional.bags import (
    DEFAULT_BIN_EDGES,
    BAGSLayout,
    bags_layout,
    bags_loss,
    bags_partition,
    bags_probs,
    bags_sample_weights,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LVIS_V1_STATS = os.path.join(
    os.path.dirname(REPO), "shared", "data", "lvis_v1_train_category_stats.json"
)

# Spec §6 toy setup: C = 6, background label 6.
TOY_COUNTS = [3, 50, 7, 500, 5000, 99]
TOY_C = 6
LN2, LN3 = math.log(2.0), math.log(3.0)

# Columns of the toy layout (spec §6): G0 (0,2) = [bg, fg]; G1 (2,3) = [oth, c0, c2];
# G2 (5,3) = [oth, c1, c5]; G3 (8,2) = [oth, c3]; G4 (10,2) = [oth, c4].
BG, FG = 0, 1
G1_OTH, C0, C2 = 2, 3, 4
G2_OTH, C1, C5 = 5, 6, 7
G3_OTH, C3 = 8, 9
G4_OTH, C4 = 10, 11


def _close(actual, expected, atol, rtol=0.0):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _toy_layout():
    return bags_layout(bags_partition(TOY_COUNTS))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- plain-Python reference


def _ref_groups(counts, edges=DEFAULT_BIN_EDGES):
    """Non-empty groups as ascending lists of class ids, in ascending bin order."""
    bins = {}
    for j, n in enumerate(counts):
        b = 1 + sum(1 for e in edges if e <= n)
        bins.setdefault(b, []).append(j)
    return [bins[b] for b in sorted(bins)]


def _ref_slices(groups):
    """[(start, length)] with G0 = (0, 2) first."""
    slices, start = [(0, 2)], 2
    for g in groups:
        slices.append((start, 1 + len(g)))
        start += 1 + len(g)
    return slices


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def _ref_targets(label, groups, num_classes):
    """Target inside each slice: G0 [bg, fg], Gn [others, classes...]."""
    out = [0 if label == num_classes else 1]
    for g in groups:
        out.append(g.index(label) + 1 if label in g else 0)
    return out


def _ref_losses(z, labels, groups, num_classes, weights):
    """Per-group sum_i w CE / max(sum_i w, 1) with Python floats; weights is (N+1) x R."""
    slices = _ref_slices(groups)
    losses = []
    for n, (start, length) in enumerate(slices):
        total, wsum = 0.0, 0.0
        for i, (row, label) in enumerate(zip(z, labels)):
            t = _ref_targets(label, groups, num_classes)[n]
            logp = _log_softmax(row[start : start + length])
            total += weights[n][i] * -logp[t]
            wsum += weights[n][i]
        losses.append(total / max(wsum, 1.0))
    return losses


def _ref_probs(z, groups, num_classes):
    slices = _ref_slices(groups)
    out = []
    for row in z:
        q_bg, q_fg = (math.exp(v) for v in _log_softmax(row[0:2]))
        scores = [0.0] * (num_classes + 1)
        for g, (start, length) in zip(groups, slices[1:]):
            p = [math.exp(v) for v in _log_softmax(row[start : start + length])]
            for k, j in enumerate(g):
                scores[j] = q_fg * p[k + 1]
        scores[num_classes] = q_bg
        out.append(scores)
    return out


# ---------------------------------------------------------------- partition


def test_partition_edges_open_the_next_bin():
    counts = [9, 10, 100, 1000, 0, 99, 999, 1_000_000, 9.5, 1]
    part = bags_partition(counts)
    assert part.dtype == torch.int64 and part.shape == (len(counts),)
    assert part.tolist() == [1, 2, 3, 4, 1, 2, 3, 4, 1, 1]
    # A tensor input (here int64) gives the same answer.
    assert bags_partition(torch.tensor([9, 10, 100, 1000, 0])).tolist() == [1, 2, 3, 4, 1]


def test_partition_toy_and_ablation_edges():
    assert bags_partition(TOY_COUNTS).tolist() == [1, 2, 1, 3, 4, 2]
    assert bags_partition(TOY_COUNTS, (100,)).tolist() == [1, 1, 1, 2, 2, 1]
    eight = (5, 10, 50, 100, 500, 1000, 5000)
    assert bags_partition([0, 4, 5, 49, 50, 99, 100, 499, 500, 4999, 5000], eight).tolist() == [
        1,
        1,
        2,
        3,
        4,
        4,
        5,
        5,
        6,
        7,
        8,
    ]
    # No edges: a single foreground group.
    assert bags_partition(TOY_COUNTS, ()).tolist() == [1] * 6


def test_zero_count_class_lands_in_first_group_and_trains():
    layout = bags_layout(bags_partition([0, 50, 0, 500]))
    assert layout.group_bins == (1, 2, 3) and layout.group_sizes == (2, 1, 1)
    # Class 0 never has positives here, but the loss and scores are finite.
    z = torch.randn(5, layout.num_logits, generator=_gen(0), requires_grad=True)
    loss = bags_loss(z, torch.tensor([1, 3, 4, 4, 2]), layout, generator=_gen(1))
    assert bool(torch.isfinite(loss).all())
    loss.sum().backward()
    assert bool(torch.isfinite(z.grad).all())


# ---------------------------------------------------------------- layout


def test_toy_layout_matches_spec():
    layout = _toy_layout()
    assert isinstance(layout, BAGSLayout)
    assert layout.num_classes == 6
    assert layout.group_bins == (1, 2, 3, 4)
    assert layout.group_sizes == (2, 2, 1, 1)
    assert layout.num_groups == 4
    assert layout.slices == ((0, 2), (2, 3), (5, 3), (8, 2), (10, 2))
    assert layout.num_logits == 12
    assert layout.class_column.dtype == torch.int64
    assert layout.class_column.tolist() == [C0, C1, C2, C3, C4, C5]
    assert layout.label_targets.dtype == torch.int64
    # Columns are labels 0..6 (6 = background); rows G0..G4.
    assert layout.label_targets.tolist() == [
        [1, 1, 1, 1, 1, 1, 0],
        [1, 0, 2, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 2, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0],
    ]


def _random_counts(rng, num_classes):
    return [
        int(10 ** rng.uniform(0, 4.5)) if rng.random() > 0.05 else 0 for _ in range(num_classes)
    ]


@pytest.mark.parametrize(
    "seed, edges", [(0, DEFAULT_BIN_EDGES), (1, (100,)), (2, (5, 10, 50, 100, 500, 1000, 5000))]
)
def test_layout_invariants(seed, edges):
    rng = random.Random(seed)
    counts = _random_counts(rng, 97)
    layout = bags_layout(bags_partition(counts, edges))
    groups = _ref_groups(counts, edges)
    c, n = len(counts), len(groups)

    assert layout.num_groups == n and layout.group_sizes == tuple(len(g) for g in groups)
    assert sum(layout.group_sizes) == c
    assert layout.num_logits == c + n + 2
    assert list(layout.slices) == _ref_slices(groups)
    # Slices tile [0, K) without overlap.
    covered = [col for start, length in layout.slices for col in range(start, start + length)]
    assert covered == list(range(layout.num_logits))
    # Every class sits in exactly one group, at a class column (never G0 or an "others" column).
    others = {start for start, _ in layout.slices[1:]}
    columns = layout.class_column.tolist()
    assert len(set(columns)) == c and not (set(columns) & (others | {0, 1}))
    for g, (start, length) in zip(groups, layout.slices[1:]):
        assert columns_of(layout, g) == list(range(start + 1, start + length))

    # Remap: a fg label is a positive in exactly one group n >= 1, at the column of its class;
    # G0's target is fg (1). Background is "others" everywhere and bg (0) in G0.
    table = layout.label_targets
    assert table.shape == (n + 1, c + 1)
    for y in range(c):
        nonzero = [k for k in range(1, n + 1) if table[k, y] != 0]
        assert len(nonzero) == 1 and table[0, y] == 1
        k = nonzero[0]
        assert layout.slices[k][0] + int(table[k, y]) == columns[y]
        assert _ref_targets(y, groups, c) == table[:, y].tolist()
    assert table[:, c].tolist() == [0] * (n + 1)


def columns_of(layout, classes):
    return [int(layout.class_column[j]) for j in classes]


def test_empty_bins_are_dropped():
    layout = bags_layout(bags_partition([150, 5000, 999, 1000]))  # no class below 100
    assert layout.group_bins == (3, 4) and layout.group_sizes == (2, 2)
    assert layout.slices == ((0, 2), (2, 3), (5, 3)) and layout.num_logits == 8
    assert layout.class_column.tolist() == [3, 6, 4, 7]

    middle = bags_layout(bags_partition([3, 500, 4]))  # bins 2 and 4 empty
    assert middle.group_bins == (1, 3) and middle.group_sizes == (2, 1)
    assert middle.num_logits == 3 + 2 + 2
    assert middle.label_targets.tolist() == [[1, 1, 1, 0], [1, 0, 2, 0], [0, 1, 0, 0]]
    # A class-free group never yields a trivial 1-logit slice.
    assert all(length >= 2 for _, length in middle.slices)


def test_layout_to_device_copies_tensors():
    layout = _toy_layout()
    moved = layout.to("cpu")
    assert isinstance(moved, BAGSLayout) and moved is not layout
    assert moved.slices == layout.slices and moved.num_logits == layout.num_logits
    assert torch.equal(moved.class_column, layout.class_column)
    assert torch.equal(moved.label_targets, layout.label_targets)
    with pytest.raises(Exception):
        layout.num_logits = 3  # frozen


# ---------------------------------------------------------------- worked examples (spec §6)


def test_example_a_merge():
    z = torch.zeros(1, 12, dtype=torch.float64)
    z[0, FG], z[0, G2_OTH], z[0, C4] = LN3, LN2, LN3
    scores = bags_probs(z, _toy_layout())
    assert scores.shape == (1, 7)
    _close(scores, [[0.25, 0.1875, 0.25, 0.375, 0.5625, 0.1875, 0.25]], atol=1e-12)


def test_example_b_zero_logits_loss():
    losses = bags_loss(torch.zeros(4, 12), torch.tensor([0, 3, 6, 6]), _toy_layout(), 8.0)
    assert losses.shape == (5,) and losses.dtype == torch.float32
    _close(losses, [LN2, LN3, 0.0, LN2, 0.0], atol=1e-6)
    assert losses[2].item() == 0.0 and losses[4].item() == 0.0
    _close(losses.sum(), 2.484907, atol=1e-6)


def _example_c_logits(dtype=torch.float64):
    z = torch.zeros(3, 12, dtype=dtype)
    z[0, FG], z[0, C2], z[0, G4_OTH] = 1.0, 2.0, 1.0
    z[1, FG], z[1, G1_OTH], z[1, C4] = 2.0, 1.0, 2.0
    z[2, BG] = 2.0
    return z


def test_example_c_loss_and_gradient():
    z = _example_c_logits().requires_grad_()
    losses = bags_loss(z, torch.tensor([2, 4, 6]), _toy_layout(), 8.0, generator=_gen(0))
    _close(losses, [0.189039, 0.629867, 0.0, 0.0, 0.377779], atol=1e-6)
    _close(losses.sum(), 1.196685, atol=1e-6)
    e = math.e
    closed_l1 = (math.log((2 + e**2) / e**2) + math.log((e + 2) / e) + LN3) / 3
    _close(losses[1], closed_l1, atol=1e-12)
    losses.sum().backward()
    assert bool(torch.isfinite(z.grad).all())
    # G2 (5..7) and G3 (8..9) are inactive: exactly zero gradient.
    assert bool((z.grad[:, 5:10] == 0).all())
    assert bool((z.grad[:, [0, 1, 2, 3, 4, 10, 11]] != 0).any(dim=0).all())


def test_example_c_merged_scores():
    scores = bags_probs(_example_c_logits(), _toy_layout())
    expected = [
        [0.077863, 0.243686, 0.575333, 0.365529, 0.196612, 0.243686, 0.268941],
        [0.186678, 0.293599, 0.186678, 0.440399, 0.775803, 0.293599, 0.119203],
        [0.039734, 0.039734, 0.039734, 0.059601, 0.059601, 0.039734, 0.880797],
    ]
    _close(scores, expected, atol=1e-6)
    # The same scores in float32.
    _close(bags_probs(_example_c_logits(torch.float32), _toy_layout()), expected, atol=1e-6)


EXAMPLE_D_LABELS = [0] + [6] * 15 + [1] * 5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_example_d_sampling_counts(seed):
    layout = _toy_layout()
    labels = torch.tensor(EXAMPLE_D_LABELS)
    w = bags_sample_weights(labels, layout, 8.0, generator=_gen(seed))
    assert w.shape == (5, 21) and w.dtype == torch.float32
    assert w.sum(dim=1).tolist() == [21.0, 9.0, 21.0, 0.0, 0.0]
    assert w[1, 0].item() == 1.0  # the G1 positive is always weighted
    assert bool((w[2, 16:] == 1).all())  # the G2 positives too
    losses = bags_loss(torch.zeros(21, 12), labels, layout, 8.0, generator=_gen(seed))
    _close(losses, [LN2, LN3, LN3, 0.0, 0.0], atol=1e-6)


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.5, 8.0, 1000.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_weight_counts_match_formula(beta, seed):
    rng = random.Random(seed)
    layout = _toy_layout()
    groups = _ref_groups(TOY_COUNTS)
    # Mostly background, as in a real batch: some groups are subsampled, some inactive.
    labels = [TOY_C if rng.random() < 0.85 else rng.randrange(TOY_C) for _ in range(150)]
    w = bags_sample_weights(torch.tensor(labels), layout, beta, generator=_gen(seed))
    assert w.shape == (5, 150)
    assert set(w.unique().tolist()) <= {0.0, 1.0}
    assert bool((w[0] == 1).all())
    for n, g in enumerate(groups, start=1):
        pos = [i for i, y in enumerate(labels) if y in g]
        num_others = len(labels) - len(pos)
        expected = len(pos) + min(math.floor(beta * len(pos)), num_others)
        assert w[n].sum().item() == expected
        assert all(w[n, i].item() == 1.0 for i in pos)


def test_sampling_is_reproducible_and_seed_dependent():
    layout = _toy_layout()
    labels = torch.tensor([TOY_C] * 190 + [0, 2, 1, 3, 4, 5, 0, 1, 3, 4])
    a = bags_sample_weights(labels, layout, generator=_gen(123))
    b = bags_sample_weights(labels, layout, generator=_gen(123))
    c = bags_sample_weights(labels, layout, generator=_gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a.sum(dim=1), c.sum(dim=1))  # only which "others" are drawn changes
    # One generator advances between calls.
    g = _gen(5)
    assert not torch.equal(
        bags_sample_weights(labels, layout, generator=g),
        bags_sample_weights(labels, layout, generator=g),
    )
    # generator=None uses torch's default CPU generator.
    torch.manual_seed(7)
    d = bags_sample_weights(labels, layout)
    torch.manual_seed(7)
    assert torch.equal(d, bags_sample_weights(labels, layout))
    # bags_loss draws exactly what bags_sample_weights draws for the same seed.
    z = torch.randn(200, 12, generator=_gen(9), dtype=torch.float64)
    weights = bags_sample_weights(labels, layout, generator=_gen(11)).tolist()
    expected = _ref_losses(z.tolist(), labels.tolist(), _ref_groups(TOY_COUNTS), TOY_C, weights)
    _close(bags_loss(z, labels, layout, generator=_gen(11)), expected, atol=1e-12)


def test_others_are_drawn_uniformly_from_a_mixed_pool():
    """Each "others" RoI (background or another group's class) is drawn with probability m/|O|."""
    layout = _toy_layout()
    # G3 (class 3) has one positive; others: 5 background RoIs and 4 RoIs of class 0 (G1).
    labels = torch.tensor([3] + [TOY_C] * 5 + [0] * 4)
    g = _gen(2024)
    draws = 3000
    hits = torch.zeros(10)
    for _ in range(draws):
        w = bags_sample_weights(labels, layout, 3.0, generator=g)
        assert w[3].sum().item() == 4.0  # 1 positive + floor(3 * 1) others
        hits += w[3]
    freq = hits / draws
    assert freq[0].item() == 1.0
    # Binomial sd ~ 0.0086: 0.04 is ~4.6 sd, and the seed is fixed.
    _close(freq[1:], torch.full((9,), 1.0 / 3.0), atol=0.04)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_and_loss_do_not_depend_on_device():
    layout = _toy_layout()
    labels = torch.tensor([TOY_C] * 190 + [0, 2, 1, 3, 4, 5, 0, 1, 3, 4])
    cpu = bags_sample_weights(labels, layout, generator=_gen(3))
    gpu = bags_sample_weights(labels.cuda(), layout.to("cuda"), generator=_gen(3))
    assert gpu.device.type == "cuda" and torch.equal(cpu, gpu.cpu())
    z = torch.randn(200, 12, generator=_gen(4))
    # A CPU layout with CUDA logits and CPU labels is moved as needed.
    loss_cpu = bags_loss(z, labels, layout, generator=_gen(3))
    loss_gpu = bags_loss(z.cuda(), labels, layout, generator=_gen(3))
    _close(loss_gpu.cpu(), loss_cpu, atol=1e-5)
    _close(bags_probs(z.cuda(), layout).cpu(), bags_probs(z, layout), atol=1e-6)
    with pytest.raises(ValueError, match="CPU"):
        bags_sample_weights(labels, layout, generator=torch.Generator(device="cuda"))


# ---------------------------------------------------------------- loss invariants


def _random_batch(seed, num_rois=64, fg_fraction=0.4, scale=3.0):
    rng = random.Random(seed)
    labels = [
        rng.randrange(TOY_C) if rng.random() < fg_fraction else TOY_C for _ in range(num_rois)
    ]
    z = scale * torch.randn(num_rois, 12, generator=_gen(seed), dtype=torch.float64)
    return z, torch.tensor(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_reference_with_all_weights_given(seed):
    layout = _toy_layout()
    z, labels = _random_batch(seed)
    weights = bags_sample_weights(labels, layout, 1.5, generator=_gen(seed)).tolist()
    expected = _ref_losses(z.tolist(), labels.tolist(), _ref_groups(TOY_COUNTS), TOY_C, weights)
    losses = bags_loss(z, labels, layout, 1.5, generator=_gen(seed))
    assert losses.dtype == torch.float64
    _close(losses, expected, atol=1e-12)
    # G0's 2-way softmax CE is the sigmoid CE on z_fg - z_bg.
    x = z[:, FG] - z[:, BG]
    y = (labels != TOY_C).to(torch.float64)
    sigmoid_ce = torch.nn.functional.binary_cross_entropy_with_logits(x, y)
    _close(losses[0], sigmoid_ce, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_shift_of_one_slice_changes_nothing(seed):
    layout = _toy_layout()
    z, labels = _random_batch(seed)
    base_loss = bags_loss(z, labels, layout, 2.0, generator=_gen(seed))
    base_probs = bags_probs(z, layout)
    for k, (start, length) in enumerate(layout.slices):
        shifted = z.clone()
        shifted[:, start : start + length] += 7.5 - 3.0 * k
        _close(bags_loss(shifted, labels, layout, 2.0, generator=_gen(seed)), base_loss, atol=1e-12)
        _close(bags_probs(shifted, layout), base_probs, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_slices_are_isolated(seed):
    layout = _toy_layout()
    z, labels = _random_batch(seed)
    z.requires_grad_()
    losses = bags_loss(z, labels, layout, 2.0, generator=_gen(seed))
    # Each L_n has gradient only on slice n.
    for n, (start, length) in enumerate(layout.slices):
        (grad,) = torch.autograd.grad(losses[n], z, retain_graph=True)
        outside = torch.ones(12, dtype=torch.bool)
        outside[start : start + length] = False
        assert bool((grad[:, outside] == 0).all())
    (base_grad,) = torch.autograd.grad(losses.sum(), z)

    # Changing slice m leaves L_n (n != m) and the gradient outside slice m unchanged.
    for m, (start, length) in enumerate(layout.slices):
        changed = z.detach().clone()
        changed[:, start : start + length] = torch.randn(64, length, dtype=torch.float64)
        changed.requires_grad_()
        new = bags_loss(changed, labels, layout, 2.0, generator=_gen(seed))
        keep = [n for n in range(len(layout.slices)) if n != m]
        _close(new[keep], losses[keep].detach(), atol=1e-12)
        (grad,) = torch.autograd.grad(new.sum(), changed)
        outside = torch.ones(12, dtype=torch.bool)
        outside[start : start + length] = False
        _close(grad[:, outside], base_grad[:, outside], atol=1e-12)


def test_inactive_groups_give_zero_loss_and_gradient():
    layout = _toy_layout()
    # Only G1 (class 0) and background: G2, G3, G4 are inactive. Big logits check for NaN.
    labels = torch.tensor([0, TOY_C, TOY_C, 0, TOY_C])
    z = (40 * torch.randn(5, 12, generator=_gen(0))).requires_grad_()
    losses = bags_loss(z, labels, layout, generator=_gen(1))
    assert bool(torch.isfinite(losses).all())
    assert losses[2:].tolist() == [0.0, 0.0, 0.0]
    assert losses[0] > 0 and losses[1] > 0
    losses.sum().backward()
    assert bool(torch.isfinite(z.grad).all())
    assert bool((z.grad[:, 5:] == 0).all())
    assert bool((z.grad[:, :5] != 0).any())


def test_no_foreground_batch_is_l0_only():
    layout = _toy_layout()
    z = torch.randn(32, 12, generator=_gen(0), dtype=torch.float64, requires_grad=True)
    labels = torch.full((32,), TOY_C)
    losses = bags_loss(z, labels, layout, generator=_gen(1))
    assert losses[1:].tolist() == [0.0] * 4
    expected_l0 = sum(-_log_softmax(row[0:2])[0] for row in z.tolist()) / 32
    _close(losses[0], expected_l0, atol=1e-12)
    _close(losses.sum(), losses[0], atol=0.0)
    losses.sum().backward()
    assert bool((z.grad[:, 2:] == 0).all())


@pytest.mark.parametrize("seed", range(5))
def test_all_zero_logits_identity(seed):
    rng = random.Random(seed)
    layout = _toy_layout()
    groups = _ref_groups(TOY_COUNTS)
    num_rois = rng.randrange(1, 40)
    labels = [rng.randrange(TOY_C + 1) for _ in range(num_rois)]
    beta = rng.choice([0.5, 1.0, 3.0, 8.0])
    losses = bags_loss(
        torch.zeros(num_rois, 12), torch.tensor(labels), layout, beta, generator=_gen(seed)
    )
    active = [g for g in groups if any(y in g for y in labels)]
    expected = LN2 + sum(math.log(len(g) + 1) for g in active)
    _close(losses.sum(), expected, atol=1e-6)


def test_empty_batch():
    layout = _toy_layout()
    z = torch.zeros(0, 12, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    losses = bags_loss(z, labels, layout, generator=_gen(0))
    assert losses.shape == (5,) and losses.tolist() == [0.0] * 5
    assert losses.requires_grad and losses.grad_fn is not None
    losses.sum().backward()
    assert z.grad is not None and z.grad.shape == (0, 12)
    assert bags_sample_weights(labels, layout, generator=_gen(0)).shape == (5, 0)
    assert bags_probs(z, layout).shape == (0, 7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_float32_results(dtype):
    layout = _toy_layout()
    z64, labels = _random_batch(3, scale=6.0)
    z = z64.to(dtype)
    z[0, C0], z[1, BG] = 30.0, -30.0  # e^30 overflows fp16
    z.requires_grad_()
    losses = bags_loss(z, labels, layout, generator=_gen(3))
    assert losses.dtype == torch.float32
    weights = bags_sample_weights(labels, layout, generator=_gen(3)).tolist()
    rounded = z.detach().double().tolist()
    expected = _ref_losses(rounded, labels.tolist(), _ref_groups(TOY_COUNTS), TOY_C, weights)
    _close(losses, expected, atol=1e-6, rtol=1e-6)
    losses.sum().backward()
    assert z.grad.dtype == dtype and bool(torch.isfinite(z.grad).all())
    probs = bags_probs(z.detach(), layout)
    assert probs.dtype == torch.float32
    _close(probs, _ref_probs(rounded, _ref_groups(TOY_COUNTS), TOY_C), atol=1e-6)


# ---------------------------------------------------------------- merged scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_scores_bounds_and_identities(seed):
    layout = _toy_layout()
    z = 10 * torch.randn(50, 12, generator=_gen(seed), dtype=torch.float64)
    z[0] = 80.0  # saturated rows stay finite
    z[1, FG] = -80.0
    scores = bags_probs(z, layout)
    assert scores.shape == (50, 7) and bool(torch.isfinite(scores).all())
    _close(scores, _ref_probs(z.tolist(), _ref_groups(TOY_COUNTS), TOY_C), atol=1e-12)
    q = torch.softmax(z[:, 0:2], dim=1)
    q_bg, q_fg = q[:, 0], q[:, 1]
    assert bool((scores >= 0).all()) and bool((scores <= 1).all())
    assert bool((scores[:, :-1] <= q_fg[:, None] + 1e-15).all())
    _close(scores[:, -1], 1 - q_fg, atol=1e-12)
    _close(scores[:, -1], q_bg, atol=1e-15, rtol=1e-14)
    for g, (start, length) in zip(_ref_groups(TOY_COUNTS), layout.slices[1:]):
        p_others = torch.softmax(z[:, start : start + length], dim=1)[:, 0]
        _close(scores[:, g].sum(dim=1) + q_fg * p_others, q_fg, atol=1e-12)
    # Not a softmax over all K logits (the sum over classes can exceed 1).
    assert bool((scores[:, :-1].sum(dim=1) <= 4 * q_fg + 1e-12).all())


def test_merged_scores_are_not_a_distribution():
    z = torch.zeros(1, 12)
    z[0, FG] = 20.0  # q_fg ~ 1; every group's "others" at 0 and classes at 5
    for col in (C0, C1, C2, C3, C4, C5):
        z[0, col] = 5.0
    scores = bags_probs(z, _toy_layout())
    assert scores[0, :-1].sum().item() > 3.9  # up to N * q_fg, here N = 4


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "counts, edges",
    [
        ([3, -1], DEFAULT_BIN_EDGES),
        ([3, float("nan")], DEFAULT_BIN_EDGES),
        ([3, float("inf")], DEFAULT_BIN_EDGES),
        ([], DEFAULT_BIN_EDGES),
        ([[3, 4], [5, 6]], DEFAULT_BIN_EDGES),
        ([3, 4], (100, 10)),
        ([3, 4], (10, 10, 100)),
        ([3, 4], (0, 10)),
        ([3, 4], (-5, 10)),
        ([3, 4], (10, float("inf"))),
        ([3, 4], (10, float("nan"))),
        ([3, 4], ((10, 100), (1000, 2000))),
        ([3, 4], ("a", "b")),
    ],
)
def test_bad_partition_inputs_raise(counts, edges):
    with pytest.raises(ValueError):
        bags_partition(counts, edges)


@pytest.mark.parametrize(
    "partition",
    [
        torch.tensor([1.0, 2.0]),
        torch.tensor([True, False]),
        torch.tensor([0, 1, 2]),
        torch.tensor([-1, 2]),
        torch.zeros(0, dtype=torch.long),
        torch.ones(2, 3, dtype=torch.long),
    ],
)
def test_bad_layout_inputs_raise(partition):
    with pytest.raises(ValueError):
        bags_layout(partition)


def test_bad_loss_and_probs_inputs_raise():
    layout = _toy_layout()
    z = torch.zeros(3, 12)
    labels = torch.tensor([0, 6, 2])
    with pytest.raises(ValueError, match="12"):
        bags_loss(torch.zeros(3, 7), labels, layout)  # C+1 columns instead of K
    with pytest.raises(ValueError):
        bags_loss(torch.zeros(12), labels, layout)
    with pytest.raises(ValueError):
        bags_loss(torch.zeros(3, 12, dtype=torch.long), labels, layout)
    with pytest.raises(ValueError, match=r"\[0, 6\]"):
        bags_loss(z, torch.tensor([0, 7, 2]), layout)
    with pytest.raises(ValueError):
        bags_loss(z, torch.tensor([0, -1, 2]), layout)
    with pytest.raises(ValueError):
        bags_loss(z, labels.float(), layout)
    with pytest.raises(ValueError):
        bags_loss(z, labels[:2], layout)
    with pytest.raises(ValueError):
        bags_loss(z, labels[None], layout)
    for beta in (0.0, -1.0, float("nan"), float("inf"), "eight"):
        with pytest.raises(ValueError, match="others_ratio"):
            bags_loss(z, labels, layout, others_ratio=beta)
        with pytest.raises(ValueError, match="others_ratio"):
            bags_sample_weights(labels, layout, others_ratio=beta)
    with pytest.raises(ValueError):
        bags_sample_weights(torch.tensor([0, 9]), layout)
    with pytest.raises(ValueError, match="12"):
        bags_probs(torch.zeros(3, 7), layout)
    with pytest.raises(ValueError):
        bags_probs(torch.zeros(12), layout)


# ---------------------------------------------------------------- LVIS v1 scale


def test_lvis_v1_groups():
    if not os.path.exists(LVIS_V1_STATS):
        pytest.skip(f"{LVIS_V1_STATS} not found (a user's clone has no shared/)")
    with open(LVIS_V1_STATS) as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    assert [c["id"] for c in categories] == list(range(1, 1204))  # contiguous ids
    counts = [c["instance_count"] for c in categories]

    part = bags_partition(counts)
    layout = bags_layout(part)
    assert layout.num_classes == 1203
    assert layout.group_bins == (1, 2, 3, 4)
    assert layout.group_sizes == (200, 412, 334, 257)
    assert layout.num_logits == 1209
    totals = [sum(n for n, b in zip(counts, part.tolist()) if b == k) for k in (1, 2, 3, 4)]
    assert totals == [770, 16_328, 116_149, 1_136_894]
    assert sorted(layout.class_column.tolist()) == sorted(
        set(range(2, 1209)) - {start for start, _ in layout.slices[1:]}
    )

    # At zero logits, each active group costs ln(|G_n| + 1) and G0 ln 2.
    labels = torch.tensor([1203] * 500 + [0, 12, 2, 5])
    groups_hit = {int(part[y]) for y in (0, 12, 2, 5)}
    losses = bags_loss(torch.zeros(504, 1209), labels, layout, generator=_gen(0))
    expected = LN2 + sum(math.log(layout.group_sizes[b - 1] + 1) for b in groups_hit)
    _close(losses.sum(), expected, atol=1e-5)
    scores = bags_probs(torch.zeros(2, 1209), layout)
    assert scores.shape == (2, 1204)
    _close(scores[0, 0], 0.5 / (layout.group_sizes[int(part[0]) - 1] + 1), atol=1e-7)
