"""Tests of longtail/functional/ecm.py: ECM margins, loss and inference scores.

Expected numbers are either pinned from the worked examples of the ECM spec (§7) or computed here
independently with plain Python ``math`` in float64; none are produced by the module under test.
"""

import json
import math
import os
import random

import pytest
import torch

from longtail.functional.ecm import ECMMargins, ecm_loss, ecm_margins, ecm_probs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LVIS_V1_STATS = os.path.join(
    os.path.dirname(REPO), "shared", "data", "lvis_v1_train_category_stats.json"
)
LVIS_BG_RATIO = 6.3313


def _close(actual, expected, atol, rtol=0.0):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _bce(x, y):
    """Plain-math BCE on a logit x, stable for large |x|."""
    return max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _reference_loss(z, labels, delta, weight):
    """(1/B) sum_i sum_c m_c BCE(2 z_ic + delta_c, y_ic) with Python floats."""
    total = 0.0
    for row, label in zip(z, labels):
        for c, z_ic in enumerate(row):
            total += weight[c] * _bce(2.0 * z_ic + delta[c], 1.0 if c == label else 0.0)
    return total / len(z)


# ---------------------------------------------------------------- Example A (spec §7)

EXAMPLE_A_COUNTS = [10, 90]
EXAMPLE_A_LOGITS = [[0.5, -1.0, 0.2], [-0.3, 0.8, 1.5]]
EXAMPLE_A_LABELS = [0, 2]


def test_example_a_margins():
    m = ecm_margins(EXAMPLE_A_COUNTS, 1.0)
    assert isinstance(m, ECMMargins)
    for t in m:
        assert t.shape == (3,) and t.dtype == torch.float64
    _close(m.gamma_pos, [0.676145, 0.512539, 0.5], atol=1e-6)
    _close(m.gamma_neg, [0.323855, 0.487461, 0.5], atol=1e-6)
    # log w^± = -log gamma^± pins the fourth root (n/4 instead of n^{1/4} gives other values).
    _close(-m.gamma_pos.log(), [0.391348, 0.668378, 0.693147], atol=1e-6)
    _close(-m.gamma_neg.log(), [1.127458, 0.718546, 0.693147], atol=1e-6)
    _close(m.delta, [-0.736110, -0.050168, 0.0], atol=1e-6)
    _close(m.weight, [0.974573, 0.730690, 0.693147], atol=1e-6)


def test_example_a_loss_and_gradient():
    m = ecm_margins(EXAMPLE_A_COUNTS, 1.0)
    z = torch.tensor(EXAMPLE_A_LOGITS, requires_grad=True)
    loss = ecm_loss(z, torch.tensor(EXAMPLE_A_LABELS), m.delta, m.weight)
    assert loss.shape == () and loss.dtype == torch.float32
    _close(loss.detach(), 1.405476, atol=1e-6)
    loss.backward()
    _close(
        z.grad,
        [[-0.423362, 0.083325, 0.414979], [0.202858, 0.602738, -0.032873]],
        atol=1e-6,
    )


def test_example_a_inference_scores():
    scores = ecm_probs(torch.tensor(EXAMPLE_A_LOGITS, dtype=torch.float64))
    _close(
        scores,
        [[0.280210, 0.121068, 0.549834], [0.077633, 0.125869, 0.817574]],
        atol=1e-6,
    )


def test_example_b_balanced_loss():
    m = ecm_margins([5], 1.0)
    _close(m.delta, [0.0, 0.0], atol=1e-12)
    _close(m.weight, [math.log(2)] * 2, atol=1e-12)
    loss = ecm_loss(torch.zeros(1, 2), torch.tensor([0]), m.delta, m.weight)
    _close(loss, 2 * math.log(2) ** 2, atol=1e-6)


# ---------------------------------------------------------------- margin invariants

SYNTHETIC_COUNTS = [1, 3, 3, 7, 20, 55, 55, 140, 999, 4000, 50552]


@pytest.mark.parametrize("r", [0.05, 1.0, LVIS_BG_RATIO, 250.0])
def test_margin_ranges_and_identities(r):
    m = ecm_margins(SYNTHETIC_COUNTS, r)
    for t in m:
        assert t.shape == (len(SYNTHETIC_COUNTS) + 1,)
        assert bool(torch.isfinite(t).all())
    _close(m.gamma_pos + m.gamma_neg, torch.ones(len(SYNTHETIC_COUNTS) + 1), atol=1e-15)
    for t in (m.gamma_pos, m.gamma_neg, m.weight):
        assert bool((t > 0).all()) and bool((t < 1).all())
    # At z = 0 the surrogate score sigmoid(delta) is the negative margin.
    _close(torch.sigmoid(m.delta), m.gamma_neg, atol=1e-14)
    # Independent float64 check of the closed forms for every channel.
    n = SYNTHETIC_COUNTS + [r * sum(SYNTHETIC_COUNTS)]
    total = sum(n)
    for c, n_pos in enumerate(n):
        n_neg = total - n_pos
        alpha = n_neg / n_pos
        assert m.gamma_pos[c].item() == pytest.approx(
            n_neg**0.25 / (n_pos**0.25 + n_neg**0.25), abs=1e-14
        )
        assert m.delta[c].item() == pytest.approx(0.25 * math.log(n_pos / n_neg), abs=1e-12)
        assert m.weight[c].item() == pytest.approx(alpha * math.log1p(1 / alpha), abs=1e-12)


def test_margins_are_scale_invariant():
    base = ecm_margins(SYNTHETIC_COUNTS, LVIS_BG_RATIO)
    scaled = ecm_margins([7 * n for n in SYNTHETIC_COUNTS], LVIS_BG_RATIO)
    for a, b in zip(base, scaled):
        _close(b, a, atol=1e-13)


def test_margins_are_monotone_in_counts():
    counts = SYNTHETIC_COUNTS[::-1]  # unsorted input; sort by count below
    m = ecm_margins(counts, LVIS_BG_RATIO)
    order = torch.argsort(torch.tensor(counts, dtype=torch.float64))
    delta, gamma_pos, weight = (t[:-1][order] for t in (m.delta, m.gamma_pos, m.weight))
    assert bool((delta.diff() >= 0).all())
    assert bool((gamma_pos.diff() <= 0).all())
    assert bool((weight.diff() <= 0).all())
    # Distinct counts give strictly different margins (the check above is not vacuous).
    assert delta[-1] > delta[0] and gamma_pos[-1] < gamma_pos[0] and weight[-1] < weight[0]


def test_balanced_case_loss_is_ln2_times_bce():
    m = ecm_margins([3], 1.0)  # one fg class, r = 1: n^+ = n^- on both channels
    _close(m.gamma_pos, [0.5, 0.5], atol=1e-15)
    z = [[0.3, -1.2], [2.0, 0.7], [-0.4, -3.0], [0.0, 1.1]]
    labels = [0, 1, 1, 0]
    loss = ecm_loss(torch.tensor(z), torch.tensor(labels), m.delta, m.weight)
    expected = math.log(2) * _reference_loss(z, labels, [0.0, 0.0], [1.0, 1.0])
    _close(loss, expected, atol=1e-6)


def test_zero_delta_unit_weight_is_plain_bce_on_2z():
    rng = random.Random(0)
    z = [[rng.uniform(-6, 6) for _ in range(5)] for _ in range(7)]
    labels = [rng.randrange(5) for _ in range(7)]
    loss = ecm_loss(
        torch.tensor(z), torch.tensor(labels), torch.zeros(5, dtype=torch.float64), torch.ones(5)
    )
    _close(loss, _reference_loss(z, labels, [0.0] * 5, [1.0] * 5), atol=1e-5, rtol=1e-6)


def test_stable_form_matches_literal_eq11():
    """BCE on 2z + delta equals the paper's exp/exp/divide/log form for |z| <= 20."""
    m = ecm_margins(EXAMPLE_A_COUNTS, 1.0)
    log_w_pos, log_w_neg = -m.gamma_pos.log(), -m.gamma_neg.log()
    grid = torch.linspace(-20.0, 20.0, 161)
    z = torch.stack([grid, grid.flip(0), 0.5 * grid], dim=1)  # (161, 3), float32
    labels = torch.arange(161) % 3
    y = torch.nn.functional.one_hot(labels, 3).double()
    literal = {}
    for dtype in (torch.float64, torch.float32):
        # Literal eq. 11; the negative term uses the complementary ratio, not 1 - s.
        zz, yy = z.to(dtype), y.to(dtype)
        pos = torch.exp(zz + log_w_pos.to(dtype))
        neg = torch.exp(-zz + log_w_neg.to(dtype))
        terms = -(yy * (pos / (pos + neg)).log() + (1 - yy) * (neg / (pos + neg)).log())
        literal[dtype] = (terms * m.weight.to(dtype)).sum(dim=1)
    assert bool(torch.isfinite(literal[torch.float32]).all())
    # The whole grid at once, plus single RoIs at the ends (z = ±20) and the middle (z = 0).
    rows = [slice(0, len(z))] + [slice(i, i + 1) for i in (0, 1, 2, 80, 158, 159, 160)]
    stable = torch.stack([ecm_loss(z[r], labels[r], m.delta, m.weight) for r in rows])
    assert stable.dtype == torch.float32
    # Per-RoI losses reach ~80 here, where one fp32 ulp is ~8e-6: "within 1e-6" can only hold
    # relatively, so the tolerance is 1e-6 absolute plus 1e-6 relative.
    for dtype in (torch.float64, torch.float32):
        expected = torch.stack([literal[dtype][r].mean() for r in rows])
        _close(stable, expected, atol=1e-6, rtol=1e-6)


def test_gradient_sign_and_rarity_ordering():
    m = ecm_margins(SYNTHETIC_COUNTS, LVIS_BG_RATIO)
    num_channels = len(SYNTHETIC_COUNTS) + 1
    torch.manual_seed(0)
    # float64 and |z| <= 15 keep sigmoid(2z + delta) off 0 and 1, so the signs are strict.
    z = (6 * torch.randn(32, num_channels, dtype=torch.float64)).clamp(-15, 15).requires_grad_()
    labels = torch.randint(0, num_channels, (32,))
    ecm_loss(z, labels, m.delta, m.weight).backward()
    target = torch.nn.functional.one_hot(labels, num_channels).bool()
    assert bool((z.grad[target] < 0).all())
    assert bool((z.grad[~target] > 0).all())

    # At z = 0, with RoI c labelled c: the positive pull 2 m (1 - gamma^-) grows with rarity and
    # the push 2 m gamma^- on a non-target channel shrinks with rarity.
    fg = len(SYNTHETIC_COUNTS)
    z0 = torch.zeros(fg, num_channels, dtype=torch.float64, requires_grad=True)
    ecm_loss(z0, torch.arange(fg), m.delta, m.weight).backward()
    pull = -z0.grad.diagonal()[:fg] * fg
    push = z0.grad[(torch.arange(fg) + 1) % fg, torch.arange(fg)] * fg
    _close(pull, 2 * m.weight[:fg] * (1 - m.gamma_neg[:fg]), atol=1e-12)
    _close(push, 2 * m.weight[:fg] * m.gamma_neg[:fg], atol=1e-12)
    distinct = [0, 1, 3, 4, 5, 7, 8, 9, 10]  # SYNTHETIC_COUNTS is sorted; skip the ties
    assert bool((pull[distinct].diff() < 0).all())
    assert bool((push[distinct].diff() > 0).all())


# ---------------------------------------------------------------- inference


def test_inference_bounds_and_bg_monotonicity():
    torch.manual_seed(1)
    z = torch.cat([15 * torch.randn(64, 6, dtype=torch.float64), torch.full((1, 6), 40.0)])
    scores = ecm_probs(z)
    p_bg = torch.sigmoid(z[:, -1:])
    assert scores.shape == z.shape
    _close(scores[:, -1:], p_bg, atol=0.0, rtol=1e-15)
    assert bool((scores[:, :-1] >= 0).all())
    assert bool((scores[:, :-1] <= 1 - p_bg).all())
    for step in (1e-3, 0.5, 5.0):
        raised = z.clone()
        raised[:, -1] += step
        assert bool((ecm_probs(raised)[:, :-1] <= scores[:, :-1]).all())
    assert ecm_probs(torch.zeros(0, 6)).shape == (0, 6)


# ---------------------------------------------------------------- edge cases of the loss


def test_empty_batch_gives_zero_loss_with_zero_gradient():
    m = ecm_margins(EXAMPLE_A_COUNTS, 1.0)
    z = torch.zeros(0, 3, requires_grad=True)
    loss = ecm_loss(z, torch.zeros(0, dtype=torch.long), m.delta, m.weight)
    assert loss.shape == () and loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert z.grad is not None and z.grad.shape == (0, 3)


def test_all_background_batch_is_finite_and_backprops():
    m = ecm_margins(SYNTHETIC_COUNTS, LVIS_BG_RATIO)
    bg = len(SYNTHETIC_COUNTS)
    torch.manual_seed(2)
    z = (20 * torch.randn(16, bg + 1)).requires_grad_()
    labels = torch.full((16,), bg)
    loss = ecm_loss(z, labels, m.delta, m.weight)
    assert torch.isfinite(loss)
    _close(
        loss,
        _reference_loss(z.tolist(), labels.tolist(), m.delta.tolist(), m.weight.tolist()),
        atol=1e-4,
        rtol=1e-6,
    )
    loss.backward()
    assert bool(torch.isfinite(z.grad).all())
    # Saturated sigmoids give exact zeros at |z| ~ 20, so only the weak sign holds there...
    assert bool((z.grad[:, -1] <= 0).all()) and bool((z.grad[:, :-1] >= 0).all())
    # ...and the strict one for moderate logits.
    z = torch.randn(16, bg + 1).requires_grad_()
    ecm_loss(z, labels, m.delta, m.weight).backward()
    assert bool((z.grad[:, -1] < 0).all()) and bool((z.grad[:, :-1] > 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_float32_loss(dtype):
    m = ecm_margins(SYNTHETIC_COUNTS, LVIS_BG_RATIO)
    torch.manual_seed(3)
    z = (8 * torch.randn(24, len(SYNTHETIC_COUNTS) + 1)).to(dtype)
    z[0, 0], z[1, -1] = 20.0, -20.0  # e^{±40} overflows fp16 in the literal form
    labels = torch.randint(0, len(SYNTHETIC_COUNTS) + 1, (24,))
    z.requires_grad_()
    loss = ecm_loss(z, labels, m.delta, m.weight)
    assert loss.dtype == torch.float32
    # The same rounded logits in float64 with plain math; fp16 arithmetic would be ~1e-3 off.
    expected = _reference_loss(
        z.detach().double().tolist(), labels.tolist(), m.delta.tolist(), m.weight.tolist()
    )
    _close(loss, expected, atol=0.0, rtol=1e-6)
    loss.backward()
    assert z.grad.dtype == dtype and bool(torch.isfinite(z.grad).all())


def test_zero_counts_are_clamped_to_one():
    clamped = ecm_margins([0, 5, 0, 12], 2.0)
    ones = ecm_margins([1, 5, 1, 12], 2.0)
    for a, b in zip(clamped, ones):
        assert bool(torch.isfinite(a).all())
        _close(a, b, atol=0.0)


@pytest.mark.parametrize(
    "counts, r",
    [
        ([3, 4], 0.0),
        ([3, 4], -1.0),
        ([3, 4], float("nan")),
        ([3, 4], float("inf")),
        ([3, -1], 1.0),
        ([3, float("nan")], 1.0),
        ([[3, 4], [5, 6]], 1.0),
        ([], 1.0),
        ([1e308, 1e308], 1.0),  # finite counts whose total overflows float64
    ],
)
def test_bad_inputs_raise_value_error(counts, r):
    with pytest.raises(ValueError):
        ecm_margins(counts, r)


# ---------------------------------------------------------------- Example C: LVIS v1 scale


def test_example_c_lvis_scale():
    if not os.path.exists(LVIS_V1_STATS):
        pytest.skip(f"{LVIS_V1_STATS} not found (a user's clone has no shared/)")
    with open(LVIS_V1_STATS) as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    counts = [c["instance_count"] for c in categories]
    assert len(counts) == 1203
    fg_total = sum(counts)
    assert (1 + LVIS_BG_RATIO) * fg_total == pytest.approx(9_311_784.71, abs=5e-3)
    assert LVIS_BG_RATIO * fg_total == pytest.approx(8_041_643.71, abs=5e-3)

    m = ecm_margins(counts, LVIS_BG_RATIO)
    alpha = torch.exp(-4 * m.delta)  # delta = -1/4 log alpha
    expected = {  # index: (alpha, alpha tolerance, gamma+, delta, m, m tolerance)
        39: (9.3118e6, 5e1, 0.982219, -4.011698, 0.99999995, 5e-9),
        44: (183.20, 5e-3, 0.786280, -1.302647, 0.997281, 5e-7),
        1203: (0.157945, 5e-7, 0.386659, 0.461376, 0.314651, 5e-7),
    }
    for c, (a, a_tol, gamma_pos, delta, weight, w_tol) in expected.items():
        assert alpha[c].item() == pytest.approx(a, abs=a_tol)
        assert m.gamma_pos[c].item() == pytest.approx(gamma_pos, abs=5e-7)
        assert m.delta[c].item() == pytest.approx(delta, abs=5e-7)
        assert m.weight[c].item() == pytest.approx(weight, abs=w_tol)
    # fg ranges of the spec: delta in [-4.01, -1.30], m in [0.99728, 0.99999995]
    assert -4.012 < m.delta[:-1].min().item() and m.delta[:-1].max().item() < -1.302
    assert m.weight[:-1].min().item() == pytest.approx(0.99728, abs=5e-6)

    order = torch.argsort(torch.tensor(counts), stable=True)
    assert bool((m.delta[:-1][order].diff() >= 0).all())
    assert bool((m.gamma_pos[:-1][order].diff() <= 0).all())
    assert bool((m.weight[:-1][order].diff() <= 0).all())

    labels = torch.tensor([1203, 44, 39])
    per_roi = [
        ecm_loss(torch.zeros(1, 1204, dtype=torch.float64), labels[i : i + 1], m.delta, m.weight)
        for i in range(3)
    ]
    _close(torch.stack(per_roi), [80.0137, 81.4580, 84.1706], atol=5e-5)
    # The float32 path (float64 buffers cast down) agrees to fp32 accuracy.
    fp32 = ecm_loss(torch.zeros(3, 1204), labels, m.delta, m.weight)
    _close(fp32, (80.0137 + 81.4580 + 84.1706) / 3, atol=1e-3)
