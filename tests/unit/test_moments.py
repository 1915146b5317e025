"""The (count, mean, M2) primitive against float64 two-pass references."""

import numpy as np
import pytest
import torch

from tasks import moments


def _ref(x):
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    return len(x), mean, ((x - mean) ** 2).sum(axis=0)


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
def test_merge_all_of_uneven_blocks_equals_two_pass(offset):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((10_000, 5)) * 0.1 + offset).astype(np.float32)
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=17, replace=False))
    parts = [moments.of_array(b) for b in np.split(x, cuts)] + [moments.empty(5)]
    got = moments.merge_all(parts)
    n, mean, m2 = _ref(x)
    assert got.count == n
    np.testing.assert_allclose(got.mean, mean, rtol=1e-14, atol=0)
    np.testing.assert_allclose(got.m2, m2, rtol=1e-9)
    np.testing.assert_allclose(got.variance(ddof=1), m2 / (n - 1), rtol=1e-9)


def test_naive_sum_of_squares_would_fail_the_hard_case():
    """Pins why the primitive is two-pass: E[x^2]-E[x]^2 in float32-accumulated form is far off."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(100_000) * 0.1 + 1e4).astype(np.float32)
    naive = float(np.mean(x * x, dtype=np.float32) - np.mean(x, dtype=np.float32) ** 2)
    ref = float(np.var(x.astype(np.float64)))
    good = float(moments.of_array(x[:, None]).variance()[0])
    assert abs(good - ref) / ref < 1e-9
    assert abs(naive - ref) / ref > 1e-2


def test_merge_with_empty_is_identity_and_order_free():
    rng = np.random.default_rng(2)
    a, b = moments.of_array(rng.normal(size=(7, 3))), moments.of_array(rng.normal(3, 2, size=(5, 3)))
    e = moments.empty(3)
    for m in (moments.merge(a, e), moments.merge(e, a)):
        np.testing.assert_array_equal(m.mean, a.mean)
        np.testing.assert_allclose(m.m2, a.m2, rtol=0, atol=0)
    ab, ba = moments.merge(a, b), moments.merge(b, a)
    np.testing.assert_allclose(ab.mean, ba.mean, rtol=1e-15)
    np.testing.assert_allclose(ab.m2, ba.m2, rtol=1e-14)


def test_of_tensor_per_channel_matches_numpy():
    x = torch.randn(6, 4, 3, 5, dtype=torch.float64) * 3 + 2
    m = moments.of_tensor(x, [0, 2, 3])
    flat = x.permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    n, mean, m2 = _ref(flat)
    assert float(m.count) == n
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-13)
    np.testing.assert_allclose(m.m2.numpy(), m2, rtol=1e-12)
    merged = moments.merge(moments.of_tensor(x[:2], [0, 2, 3]), moments.of_tensor(x[2:], [0, 2, 3]))
    np.testing.assert_allclose(merged.m2.numpy(), m2, rtol=1e-12)
