"""Shard id specs: 0-15, 0,2,4-7, 3."""

from __future__ import annotations

import pytest

from spectacles_gateway.shardspec import (
    MAX_SHARD_ID,
    ShardSpecError,
    format_shard_spec,
    parse_shard_spec,
)


@pytest.mark.parametrize(
    ("spec", "ids"),
    [
        ("3", (3,)),
        ("0", (0,)),
        ("0-15", tuple(range(16))),
        ("0,2,4-7", (0, 2, 4, 5, 6, 7)),
        ("4-7,0,2", (0, 2, 4, 5, 6, 7)),  # sorted
        ("1,1,1", (1,)),  # duplicates are fine
        ("0-3,2-5", (0, 1, 2, 3, 4, 5)),  # overlaps merge
        ("5-5", (5,)),
        (" 0 , 2-3 ", (0, 2, 3)),  # spaces around items
        ("007", (7,)),
        (f"{MAX_SHARD_ID}", (MAX_SHARD_ID,)),
    ],
)
def test_valid(spec: str, ids: tuple[int, ...]) -> None:
    assert parse_shard_spec(spec) == ids


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "empty shard spec"),
        ("   ", "empty shard spec"),
        (",", "empty item"),
        ("0,", "empty item"),
        (",0", "empty item"),
        ("0,,1", "empty item"),
        ("5-2", "descending range '5-2'"),
        ("a", "invalid item 'a'"),
        ("-1", "invalid item '-1'"),
        ("1--2", "invalid item '1--2'"),
        ("1-", "invalid item '1-'"),
        ("-", "invalid item '-'"),
        ("1-2-3", "invalid item '1-2-3'"),
        ("1.5", "invalid item '1.5'"),
        ("0x10", "invalid item '0x10'"),
        ("1 2", "invalid item '1 2'"),
        ("\u0663", "invalid item"),  # Arabic-Indic digit three: ASCII digits only
        (f"0-{MAX_SHARD_ID + 1}", "too large"),
        ("0-99999999999999", "too large"),
    ],
)
def test_invalid(spec: str, fragment: str) -> None:
    with pytest.raises(ShardSpecError) as info:
        parse_shard_spec(spec)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("ids", "spec"),
    [
        ((), ""),
        ((3,), "3"),
        (range(16), "0-15"),
        ((0, 2, 4, 5, 6, 7), "0,2,4-7"),
        ((7, 5, 6, 0, 0), "0,5-7"),
        ((1, 3, 5), "1,3,5"),
    ],
)
def test_format(ids: tuple[int, ...], spec: str) -> None:
    assert format_shard_spec(ids) == spec
    if spec:
        assert parse_shard_spec(spec) == tuple(sorted(set(ids)))
