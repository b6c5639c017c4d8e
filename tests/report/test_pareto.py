"""The Pareto frontier against a brute-force definition of domination."""
from __future__ import annotations

from hypothesis import given, strategies as st

from netshrink.report.plots import pareto_front

values = st.floats(min_value=0, max_value=10, allow_nan=False).map(lambda v: round(v, 1))


@given(st.lists(st.tuples(values, values), min_size=1, max_size=25))
def test_front_is_exactly_the_undominated_points(points):
    lat = [p[0] for p in points]
    qual = [p[1] for p in points]
    front = set(pareto_front(lat, qual))
    for i, (li, qi) in enumerate(points):
        dominated = any(lj <= li and qj >= qi and (lj, qj) != (li, qi) for lj, qj in points)
        assert (i in front) == (not dominated)


def test_front_is_sorted_by_latency():
    lat = [3.0, 1.0, 2.0, 2.5]
    qual = [0.99, 0.90, 0.95, 0.94]
    assert pareto_front(lat, qual) == [1, 2, 0]


def test_missing_values_are_never_on_the_front():
    nan = float("nan")
    assert pareto_front([1.0, 2.0, nan, 0.5], [0.9, 0.95, 0.99, nan]) == [0, 1]
