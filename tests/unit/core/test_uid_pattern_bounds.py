"""The bounds of uid patterns (dmoe.core.uids), each at its edge: a pattern names at most 2**20
experts (exactly that many is fine, one row more is refused, and the message says how many it named),
a reversed range is as empty as an equal one, and a list naming many uids twice names the first five."""

from __future__ import annotations

import pytest

from dmoe.core.uids import expand_pattern, expand_patterns

pytestmark = pytest.mark.timeout(60)


def test_a_pattern_names_at_most_two_to_the_twenty_experts():
    assert len(expand_pattern("ffn.[0:1024].[0:1024]")) == 1 << 20
    with pytest.raises(ValueError, match=r"names 1049600 experts; at most 1048576$"):
        expand_pattern("ffn.[0:1025].[0:1024]")
    with pytest.raises(ValueError, match=r"names 2097152 experts; at most 1048576$"):
        expand_pattern("ffn.[0:2].[0:1024].[0:1024]")


@pytest.mark.parametrize("bad", ["ffn.[3:1]", "ffn.[1:0].[0:2]", "ffn.[0:2].[9:2]"])
def test_a_reversed_range_is_refused_as_empty(bad):
    with pytest.raises(ValueError, match=r"empty range \[\d+:\d+\]"):
        expand_pattern(bad)


def test_uids_named_twice_are_listed_five_at_most():
    with pytest.raises(ValueError, match=r"named twice: ffn\.0, ffn\.1, ffn\.2, ffn\.3, ffn\.4$"):
        expand_patterns(["ffn.[0:7]", "ffn.[0:7]"])
    with pytest.raises(ValueError, match=r"named twice: ffn\.2$"):
        expand_patterns(["ffn.[0:3]", "ffn.2"])
