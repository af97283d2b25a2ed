"""The simulated engine's (a test double's) synthetic weights: the pure byte layout."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparkd.sim.loading import MIB, safetensors_header, synthetic_chunk


@given(st.integers(256, 64 * MIB))
def test_header_makes_a_valid_safetensors_file_of_the_exact_size(total: int) -> None:
    header = safetensors_header(total)
    length = int.from_bytes(header[:8], "little")
    assert len(header) == 8 + length
    assert length % 8 == 0
    meta = json.loads(header[8:])
    start, end = meta["weight"]["data_offsets"]
    assert start == 0
    assert len(header) + end == total
    assert meta["weight"]["shape"] == [end]
    assert "test double" in meta["__metadata__"]["generator"]


def test_header_needs_room() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        safetensors_header(16)


def test_chunks_are_deterministic_and_distinct() -> None:
    assert synthetic_chunk(3, 1024) == synthetic_chunk(3, 1024)
    assert synthetic_chunk(3, 1024) != synthetic_chunk(4, 1024)
    assert len(synthetic_chunk(0, MIB)) == MIB
