"""HashSet: a flat table of 64-bit hashes behaves as a set of them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from connectors.hashset import HashSet

HASHES = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(st.lists(st.one_of(HASHES, st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63)])), max_size=3000))
def test_it_answers_as_a_python_set_of_the_same_hashes(values: list[int]) -> None:
    table = HashSet(capacity=4)  # small, so it grows many times
    reference: set[int] = set()
    for value in values:
        assert table.add(value) == (value not in reference)
        reference.add(value)
    assert len(table) == len(reference)
    assert all(value in table for value in reference)
    # Members are Python hash() values, signed 64-bit: probe neighbours within that range.
    absent = {v + 1 for v in reference if v + 1 < 2**63} - reference
    assert not any(value in table for value in absent)


def test_zero_is_a_member_like_any_other() -> None:
    table = HashSet()
    assert 0 not in table
    assert table.add(0)
    assert 0 in table
    assert not table.add(0)
    assert len(table) == 1


def test_hashes_of_ids_are_found_again_across_growth() -> None:
    table = HashSet(capacity=8)
    ids = [f"enc-{n}" for n in range(5000)]
    assert all(table.add(hash(i)) for i in ids)
    assert not any(table.add(hash(i)) for i in ids)
    assert len(table) == 5000
    assert "enc-1" not in table  # a str is not a hash
