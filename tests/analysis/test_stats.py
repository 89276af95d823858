"""Seed statistics: the t quantile against published tables, intervals by hand."""

from __future__ import annotations

import math

import pytest

from deepdelta.analysis.stats import betainc, estimate, paired_difference, t_cdf, t_quantile


@pytest.mark.parametrize(
    "df, p, expected",  # Student-t critical values (e.g. NIST/SEMATECH e-Handbook, Table 1.3.6.7.2)
    [(1, 0.975, 12.706), (2, 0.975, 4.303), (3, 0.975, 3.182), (4, 0.975, 2.776), (9, 0.975, 2.262),
     (30, 0.975, 2.042), (100, 0.975, 1.984), (5, 0.995, 4.032), (10, 0.95, 1.812), (1, 0.75, 1.000)],
)  # fmt: skip
def test_t_quantile_matches_tables(df, p, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-3)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-3)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_closed_forms():
    for p in [0.6, 0.9, 0.975, 0.999]:
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 − Σ binomial terms, by hand
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959966, abs=1e-5)  # the normal limit


def test_estimate_and_paired_difference_by_hand():
    est = estimate([2.0, 4.0, 9.0])
    assert est.mean == 5.0 and est.n == 3
    assert est.std == pytest.approx(math.sqrt(((2 - 5) ** 2 + (4 - 5) ** 2 + (9 - 5) ** 2) / 2))
    half = 4.302652729749 * est.std / math.sqrt(3)
    assert (est.low, est.high) == pytest.approx((5 - half, 5 + half))
    one = estimate([1.5, math.nan])
    assert one.mean == 1.5 and one.n == 1 and math.isnan(one.std) and math.isnan(one.low)
    diff = paired_difference({0: 3.0, 1: 5.0, 2: 7.0}, {0: 1.0, 1: 4.0, 7: 0.0})  # seeds 0 and 1 pair up
    assert diff.n == 2 and diff.mean == pytest.approx(1.5)
    assert diff.high - diff.mean == pytest.approx(12.706204736 * math.sqrt(0.5) / math.sqrt(2))
    assert estimate([]).n == 0 and math.isnan(estimate([]).mean)
