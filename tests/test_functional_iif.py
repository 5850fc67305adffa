"""Tests of longtail/functional/iif.py: IIF weights, weighted logits, loss and inference scores.

Expected numbers are either pinned from the worked examples and reference values of the IIF spec
(§6) or computed here independently with plain Python ``math`` / ``statistics`` in float64; none
are produced by the module under test.
"""

import json
import math
import os
import random
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F

from longtail.functional.iif import IIF_VARIANTS, iif_logits, iif_loss, iif_probs, iif_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LVIS_V1_STATS = os.path.join(
    os.path.dirname(REPO), "shared", "data", "lvis_v1_train_category_stats.json"
)
LVIS_V1_NUM_IMAGES = 100170
LVIS_V1_NUM_INSTANCES = 1270141


def _close(actual, expected, atol, rtol=0.0):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _reference_weight(variant, f, k):
    """Table III / spec §2 with Python floats; f >= 1 (zero counts are tested separately)."""
    p = f / k
    if variant == "raw":
        return math.log(k / f)
    if variant == "smooth":
        return math.log((k + 1) / (f + 1)) + 1
    if variant == "relative":
        return math.log((k - f) / f)
    if variant == "base2":
        return math.log2(k / f)
    if variant == "base10":
        return math.log10(k / f)
    if variant == "gombit":
        return -math.log(-math.log(1 - p))
    if variant == "normit":
        return NormalDist().inv_cdf(1 - p)
    raise AssertionError(variant)


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def _reference_ce(z, labels, w):
    """(1/B) sum_i -log softmax(w * z_i)[y_i] with Python floats (log-sum-exp form)."""
    total = 0.0
    for row, y in zip(z, labels):
        wz = [a * b for a, b in zip(w, row)]
        m = max(wz)
        total += m + math.log(sum(math.exp(x - m) for x in wz)) - wz[y]
    return total / len(z)


def test_variant_names():
    assert IIF_VARIANTS == ("raw", "smooth", "relative", "base2", "base10", "gombit", "normit")


# ---------------------------------------------------------------- weights

HAND_COUNTS = [1, 3, 20, 77, 250, 499]
HAND_K = 1000


@pytest.mark.parametrize("variant", IIF_VARIANTS)
def test_weights_match_independent_formulas(variant):
    w = iif_weights(torch.tensor(HAND_COUNTS), HAND_K, variant)
    assert w.shape == (len(HAND_COUNTS) + 1,) and w.dtype == torch.float64
    expected = [_reference_weight(variant, f, HAND_K) for f in HAND_COUNTS] + [1.0]
    _close(w, expected, atol=1e-12, rtol=1e-12)


EXAMPLE_A = {  # spec §6 Example A: f = [1, 10, 100, 1000], K = 10000 (4 decimals)
    "raw": [9.2103, 6.9078, 4.6052, 2.3026],
    "smooth": [9.5173, 7.8125, 5.5953, 3.3017],
    "relative": [9.2102, 6.9068, 4.5951, 2.1972],
    "base2": [13.2877, 9.9658, 6.6439, 3.3219],
    "base10": [4.0, 3.0, 2.0, 1.0],
    "gombit": [9.2103, 6.9073, 4.6001, 2.2504],
    "normit": [3.7190, 3.0902, 2.3263, 1.2816],
}


@pytest.mark.parametrize("variant", IIF_VARIANTS)
def test_example_a_num_images(variant):
    w = iif_weights([1, 10, 100, 1000], 10000, variant)
    _close(w, EXAMPLE_A[variant] + [1.0], atol=5e-5)


def test_example_a_paper_k_is_sum_of_counts():
    # num_images=None: K = sum f = 1111 (paper eq. 11). p = 0.9 for the last class, so the
    # relative, normit and gombit weights are negative and must be asked for explicitly.
    counts = [1, 10, 100, 1000]
    _close(iif_weights(counts, None, "raw"), [7.0130, 4.7104, 2.4078, 0.1053, 1.0], atol=5e-5)
    get = lambda v: iif_weights(counts, None, v, allow_nonpositive=True)  # noqa: E731
    _close(get("relative"), [7.0121, 4.7014, 2.3135, -2.1982, 1.0], atol=5e-5)
    _close(get("normit"), [3.1214, 2.3656, 1.3407, -1.2821, 1.0], atol=5e-5)
    _close(get("gombit")[3], -0.8344, atol=5e-5)
    # Explicit K = 1111 is the same thing.
    _close(iif_weights(counts, 1111, "raw"), iif_weights(counts, None, "raw"), atol=0.0)
    for variant in ("relative", "normit", "gombit"):
        with pytest.raises(ValueError, match="<= 0"):
            iif_weights(counts, None, variant)


def test_lvis_reference_values():
    # spec §6 item 7, K_img = 100,170 and K_inst = 1,270,141; these need no data file.
    img = [1, 10, 100, 1977]
    _close(
        iif_weights(img, LVIS_V1_NUM_IMAGES, "raw")[:4],
        [11.5146, 9.2120, 6.9095, 3.9253],
        atol=5e-5,
    )
    _close(iif_weights(img, LVIS_V1_NUM_IMAGES, "smooth")[0], 11.8215, atol=5e-5)
    _close(iif_weights(img, LVIS_V1_NUM_IMAGES, "base10")[0], 5.0007, atol=5e-5)
    _close(iif_weights(img, LVIS_V1_NUM_IMAGES, "normit")[[0, 3]], [4.2653, 2.0592], atol=5e-5)
    inst = [1, 50552]
    _close(iif_weights(inst, LVIS_V1_NUM_INSTANCES, "base10")[:2], [6.1039, 1.4001], atol=5e-5)
    _close(iif_weights(inst, LVIS_V1_NUM_INSTANCES, "raw")[:2], [14.0546, 3.2239], atol=5e-5)


def test_paper_k_shifts_raw_weights_by_a_constant():
    # K = num_images vs K = sum(counts) differ by ln(sum / num_images) in every raw weight:
    # pins that num_images really is the K of the formulas.
    counts = [3, 8, 40]
    shift = iif_weights(counts, None, "raw")[:3] - iif_weights(counts, 45, "raw")[:3]
    _close(shift, [math.log(51 / 45)] * 3, atol=1e-12)


@pytest.mark.parametrize("variant", IIF_VARIANTS)
def test_rarer_class_gets_larger_weight(variant):
    # Invariant 1, over the whole p range (0, 1): strictly decreasing in f.
    k = 200
    w = iif_weights(list(range(1, k)), k, variant, allow_nonpositive=True)[:-1]
    assert bool((w[1:] < w[:-1]).all())


def test_base2_and_base10_are_rescaled_raw():
    raw = iif_weights(HAND_COUNTS, HAND_K, "raw")[:-1]
    _close(iif_weights(HAND_COUNTS, HAND_K, "base2")[:-1], raw / math.log(2), atol=1e-12)
    _close(iif_weights(HAND_COUNTS, HAND_K, "base10")[:-1], raw / math.log(10), atol=1e-12)


def test_variant_ordering():
    # Invariant 3: relative <= gombit <= raw < smooth for 0 < p < 1; smooth >= 1;
    # smooth - raw > 1 - ln 2 for f >= 1.
    k = 500
    counts = list(range(1, k))
    get = lambda v: iif_weights(counts, k, v, allow_nonpositive=True)[:-1]  # noqa: E731
    rel, gom, raw, smooth = get("relative"), get("gombit"), get("raw"), get("smooth")
    assert bool((rel <= gom).all()) and bool((gom <= raw).all()) and bool((raw < smooth).all())
    assert bool((smooth >= 1).all())
    assert bool((smooth - raw > 1 - math.log(2)).all())


def test_sign_thresholds():
    # Invariant 4: relative, normit > 0 iff p < 0.5; gombit > 0 iff p < 1 - 1/e.
    k = 1000
    counts = [c for c in range(1, k) if c != 500]  # p = 0.5 exactly is 0 up to rounding
    p = torch.tensor(counts, dtype=torch.float64) / k
    get = lambda v: iif_weights(counts, k, v, allow_nonpositive=True)[:-1]  # noqa: E731
    assert torch.equal(get("relative") > 0, p < 0.5)
    assert torch.equal(get("normit") > 0, p < 0.5)
    assert torch.equal(get("gombit") > 0, p < 1 - math.exp(-1))
    for variant in ("raw", "smooth", "base2", "base10"):
        assert bool((get(variant) > 0).all())


@pytest.mark.parametrize("variant", IIF_VARIANTS)
def test_background_weight_is_one_and_last(variant):
    w = iif_weights([5, 2, 9], 30, variant)
    assert w.shape == (4,)
    assert w[-1].item() == 1.0
    assert bool((w[:-1] != 1.0).all())


@pytest.mark.parametrize("variant", IIF_VARIANTS)
def test_zero_count_is_finite(variant):
    k = 40
    w = iif_weights([0, 1, 7], k, variant)
    assert bool(torch.isfinite(w).all()) and bool((w > 0).all())
    if variant == "smooth":
        # smooth is defined at f = 0 (paper §III-A): ln(K + 1) + 1, no clamp.
        _close(w[0], math.log(k + 1) + 1, atol=1e-12)
    else:
        # The others clamp f >= 1: an absent class weighs like a class seen once.
        _close(w[0], _reference_weight(variant, 1, k), atol=1e-12)
    assert w[0] > w[2]


@pytest.mark.parametrize("variant", IIF_VARIANTS)
def test_tensor_and_list_counts_agree(variant):
    a = iif_weights([4, 9, 1], 30, variant)
    b = iif_weights(torch.tensor([4.0, 9.0, 1.0], dtype=torch.float32), torch.tensor(30), variant)
    _close(a, b, atol=0.0)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("variant", ["IIF", "RAW", "prob", "base10_obj", "", None, 3])
def test_unknown_variant(variant):
    with pytest.raises(ValueError, match="variant") as err:
        iif_weights([1, 2], 10, variant)
    for name in IIF_VARIANTS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "counts, num_images, match",
    [
        ([[1, 2]], 10, "1-D"),
        ([], 10, "1-D"),
        (5, 10, "1-D"),
        ([1, -1], 10, "non-negative"),
        ([1, float("nan")], 10, "finite"),
        ([1, float("inf")], 10, "finite"),
        ([1, 2], 0, "K = num_images"),
        ([1, 2], -5, "K = num_images"),
        ([1, 2], 0.5, "K = num_images"),
        ([1, 2], float("nan"), "K = num_images"),
        ([1, 2], float("inf"), "K = num_images"),
        ([0, 0], None, "sum"),
        ([3, 11], 10, "exceed"),
    ],
)
def test_bad_counts_or_normaliser(counts, num_images, match):
    with pytest.raises(ValueError, match=match):
        iif_weights(counts, num_images, "raw")


def test_nonpositive_weights_raise_by_default():
    # p = 0.8: relative/normit/gombit < 0 (spec §7: a negative weight flips the logit).
    for variant in ("relative", "normit", "gombit"):
        with pytest.raises(ValueError, match="<= 0"):
            iif_weights([40, 7, 1], 50, variant)
        assert iif_weights([40, 7, 1], 50, variant, allow_nonpositive=True)[0] < 0
    # f = K: raw weight 0 zeroes the logit.
    with pytest.raises(ValueError, match="<= 0"):
        iif_weights([50, 1], 50, "raw")
    # f = K: relative/gombit/normit are infinite; that is never allowed.
    for variant in ("relative", "gombit", "normit"):
        with pytest.raises(ValueError, match="not finite"):
            iif_weights([50, 1], 50, variant, allow_nonpositive=True)
    # smooth is fine at f = K (weight 1).
    _close(iif_weights([50, 1], 50, "smooth")[0], 1.0, atol=1e-12)


def test_bad_logit_shapes():
    w = iif_weights([1, 2], 10, "raw")
    for fn in (iif_logits, iif_probs):
        with pytest.raises(ValueError, match="logits"):
            fn(torch.zeros(3), w)
        with pytest.raises(ValueError, match="logits"):
            fn(torch.zeros(2, 4), w)
    with pytest.raises(ValueError, match="logits"):
        iif_loss(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), w)
    with pytest.raises(ValueError, match="gt_classes"):
        iif_loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), w)


# ---------------------------------------------------------------- weighted logits, loss, probs

EXAMPLE_B_W = [6.907755, 4.605170, 2.302585, 1.0]
EXAMPLE_B_Z = [-1.0, 0.5, 0.5, 2.0]


def test_example_b_detection_head():
    w = iif_weights([1, 10, 100], 1000, "raw")
    _close(w, EXAMPLE_B_W, atol=1e-6)
    z = torch.tensor([EXAMPLE_B_Z], dtype=torch.float64, requires_grad=True)
    _close(iif_logits(z, w).detach(), [[-6.907755, 2.302585, 1.151293, 2.0]], atol=1e-6)
    _close(iif_probs(z, w).detach(), [[0.000049, 0.486563, 0.153865, 0.359524]], atol=1e-6)
    _close(torch.softmax(z.detach(), 1), [[0.033279, 0.149146, 0.149146, 0.668428]], atol=1e-6)

    loss = iif_loss(z, torch.tensor([1]), w)
    _close(loss.detach(), 0.720389, atol=1e-6)
    loss.backward()
    _close(z.grad, [[0.000336, -2.364466, 0.354286, 0.359524]], atol=1e-6)
    _close(iif_loss(z, torch.tensor([3]), w).detach(), 1.022974, atol=1e-6)


def test_example_c_signs_preserved():
    # A background RoI's negative fg logits stay negative (additive -ln p would flip two).
    w = iif_weights([1, 10, 100], 1000, "raw")  # p = [0.001, 0.01, 0.1]
    z = torch.tensor([[-0.5, -2.0, -3.0, 0.0]], dtype=torch.float64)
    wz = iif_logits(z, w)
    _close(wz[0, :3], [-3.4539, -9.2103, -6.9078], atol=5e-5)
    assert bool((wz[0, :3] < 0).all())


def test_example_d_post_process_classification():
    # No background in classification: a -inf background logit removes that column exactly.
    z = torch.tensor([[2.0, 1.5, 1.0, -math.inf]], dtype=torch.float64)
    raw = iif_weights([900, 90, 10], 1000, "raw")
    _close(raw[:3], [0.105361, 2.407946, 4.605170], atol=1e-6)
    _close(iif_probs(z, raw)[0], [0.008929, 0.267857, 0.723214, 0.0], atol=1e-6)
    smooth = iif_weights([900, 90, 10], 1000, "smooth")
    _close(smooth[:3], [1.105250, 3.397895, 5.510860], atol=1e-6)
    _close(iif_probs(z, smooth)[0], [0.021715, 0.389308, 0.588977, 0.0], atol=1e-6)
    _close(torch.softmax(z, 1)[0], [0.506480, 0.307196, 0.186324, 0.0], atol=1e-6)


@pytest.mark.parametrize("variant", IIF_VARIANTS)
def test_weighting_is_columnwise_and_keeps_signs(variant):
    torch.manual_seed(0)
    w = iif_weights([1, 5, 30, 200, 9], 500, variant)
    z = torch.randn(64, 6)
    out = iif_logits(z, w)
    assert out.dtype == torch.float32 and out.shape == z.shape
    for c in range(6):
        _close(out[:, c], z[:, c].double() * w[c].item(), atol=1e-5, rtol=1e-6)
    assert torch.equal(torch.sign(out), torch.sign(z))
    assert torch.equal(out[:, -1], z[:, -1])  # background unchanged


def test_weights_cast_to_logit_dtype():
    w = iif_weights([2, 3], 10, "base10")
    z = torch.ones(2, 3, dtype=torch.float16)
    assert iif_logits(z, w).dtype == torch.float16


@pytest.mark.parametrize("variant", IIF_VARIANTS)
def test_loss_is_cross_entropy_on_weighted_logits(variant):
    rng = random.Random(1)
    w = iif_weights([2, 13, 77, 5], 200, variant)
    z = [[rng.uniform(-4, 4) for _ in range(5)] for _ in range(9)]
    labels = [rng.randrange(5) for _ in range(9)]
    zt = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    loss = iif_loss(zt, torch.tensor(labels), w)
    assert loss.shape == () and loss.dtype == torch.float32
    _close(loss.detach(), _reference_ce(z, labels, w.tolist()), atol=1e-5)
    wf = w.float()
    _close(loss.detach(), F.cross_entropy(zt.detach() * wf, torch.tensor(labels)), atol=1e-6)
    # Gradient (eq. 16): w * (q - onehot(y)) / B.
    loss.backward()
    expected = []
    for row, y in zip(z, labels):
        q = _softmax([a * b for a, b in zip(w.tolist(), row)])
        expected.append([w[c].item() * (q[c] - (c == y)) / len(z) for c in range(5)])
    _close(zt.grad, expected, atol=1e-5)


def test_all_ones_weights_give_plain_cross_entropy():
    torch.manual_seed(2)
    z = torch.randn(7, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 3, 2, 3, 0])
    assert iif_loss(z, y, torch.ones(4)).item() == F.cross_entropy(z, y).item()


def test_empty_batch_loss_is_zero_and_backprops():
    w = iif_weights([3, 1], 10, "raw")
    z = torch.zeros(0, 3, requires_grad=True)
    loss = iif_loss(z, torch.zeros(0, dtype=torch.long), w)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert z.grad is not None and z.grad.shape == (0, 3)
    assert iif_probs(torch.zeros(0, 3), w).shape == (0, 3)


def test_fp16_logits_are_computed_in_float32():
    w = iif_weights([1, 4, 60], LVIS_V1_NUM_IMAGES, "base2")  # weights up to ~16.6
    torch.manual_seed(3)
    z = (torch.randn(32, 4) * 6).half().requires_grad_()
    y = torch.randint(0, 4, (32,))
    loss = iif_loss(z, y, w)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    z32 = z.detach().float()  # the same (fp16-rounded) values, in fp32
    _close(loss.detach(), F.cross_entropy(z32 * w.float(), y), atol=1e-6)
    loss.backward()
    assert z.grad.dtype == torch.float16 and bool(torch.isfinite(z.grad).all())

    probs = iif_probs(z.detach(), w)
    assert probs.dtype == torch.float32
    _close(probs, torch.softmax(z32 * w.float(), 1), atol=1e-6)
    _close(probs.sum(1), torch.ones(32), atol=1e-6)


@pytest.mark.parametrize("variant", IIF_VARIANTS)
def test_probs_are_a_distribution_with_background_last(variant):
    rng = random.Random(4)
    w = iif_weights([1, 10, 300], 1000, variant)
    z = [[rng.uniform(-8, 8) for _ in range(4)] for _ in range(20)]
    probs = iif_probs(torch.tensor(z, dtype=torch.float64), w)
    assert probs.shape == (20, 4)
    assert bool((probs >= 0).all()) and bool((probs <= 1).all())
    _close(probs.sum(1), torch.ones(20, dtype=torch.float64), atol=1e-12)
    expected = [_softmax([a * b for a, b in zip(w.tolist(), row)]) for row in z]
    _close(probs, expected, atol=1e-12)
    # A RoI with a dominant background logit puts (almost) all mass in the last column.
    bg = iif_probs(torch.tensor([[-1.0, -1.0, -1.0, 30.0]]), w)
    assert bg[0, -1].item() > 0.999999 and bg.argmax().item() == 3


# ---------------------------------------------------------------- LVIS v1 (spec §6 item 7)


@pytest.fixture(scope="module")
def lvis_v1():
    if not os.path.exists(LVIS_V1_STATS):
        pytest.skip(f"{LVIS_V1_STATS} not found")
    with open(LVIS_V1_STATS) as f:
        data = json.load(f)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    return (
        [c["image_count"] for c in cats],
        [c["instance_count"] for c in cats],
        data["num_images"],
    )


def _range(w):
    fg = w[:-1]
    return [fg.min().item(), fg.max().item()]


def test_lvis_v1_counts(lvis_v1):
    images, instances, num_images = lvis_v1
    assert len(images) == 1203 and num_images == LVIS_V1_NUM_IMAGES
    assert sum(instances) == LVIS_V1_NUM_INSTANCES
    assert min(images) == 1 and max(images) == 1977 and max(instances) == 50552


def test_lvis_v1_iif_ranges(lvis_v1):
    images, _, num_images = lvis_v1
    _close(_range(iif_weights(images, num_images, "raw")), [3.9253, 11.5146], atol=5e-5)
    _close(_range(iif_weights(images, num_images, "base10")), [1.7047, 5.0007], atol=5e-5)
    # The paper's K = sum IF = 360,952 shifts every raw weight by ln(360952 / 100170) ~ 1.28.
    shift = iif_weights(images, None, "raw") - iif_weights(images, num_images, "raw")
    _close(
        shift[:-1], torch.full((1203,), math.log(360952 / 100170), dtype=torch.float64), atol=1e-9
    )


def test_lvis_v1_iof_ranges(lvis_v1):
    _, instances, _ = lvis_v1
    # IOF: instance counts with K = total instances (num_images=None).
    _close(_range(iif_weights(instances, None, "base10")), [1.4001, 6.1039], atol=5e-5)
    _close(_range(iif_weights(instances, None, "raw")), [3.2239, 14.0546], atol=5e-5)
    assert iif_weights(instances, None, "base2").max().item() == pytest.approx(20.28, abs=5e-3)


@pytest.mark.parametrize("variant", IIF_VARIANTS)
def test_lvis_v1_every_weight_positive_and_finite(lvis_v1, variant):
    images, instances, num_images = lvis_v1
    for w in (iif_weights(images, num_images, variant), iif_weights(instances, None, variant)):
        assert w.shape == (1204,) and w[-1].item() == 1.0
        assert bool(torch.isfinite(w).all()) and bool((w > 0).all())
