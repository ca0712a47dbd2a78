import pytest

from dmoe.core.records import prefix_entries
from dmoe.core.uids import expand_pattern, expand_patterns, is_valid_uid, split_uid

pytestmark = pytest.mark.timeout(30)


def test_patterns_expand_to_grids():
    assert expand_pattern("ffn.[0:3]") == ["ffn.0", "ffn.1", "ffn.2"]
    assert expand_pattern("ffn.[0:2].[5:7]") == ["ffn.0.5", "ffn.0.6", "ffn.1.5", "ffn.1.6"]
    assert expand_pattern("ffn.3.[0:2]") == ["ffn.3.0", "ffn.3.1"]
    assert len(expand_pattern("ffn.[0:64].[0:64]")) == 4096
    assert expand_patterns(["a.[0:2]", "b.7"]) == ["a.0", "a.1", "b.7"]


@pytest.mark.parametrize("bad", ["ffn", "ffn.[3:3]", "ffn.[a:2]", "3ffn.[0:2]", "ffn.01", "ffn.[0:2",
                                 "ffn..1"])
def test_bad_patterns_say_why(bad):
    with pytest.raises(ValueError, match="pattern"):
        expand_pattern(bad)


def test_duplicates_are_rejected():
    with pytest.raises(ValueError, match="ffn.1"):
        expand_patterns(["ffn.[0:2]", "ffn.[1:3]"])


def test_uid_validation_and_prefixes():
    assert is_valid_uid("ffn.0.12") and not is_valid_uid("ffn") and not is_valid_uid("ffn.-1")
    assert split_uid("layer_2.3.5") == ("layer_2", (3, 5))
    assert prefix_entries("ffn.3.5") == [("ffn.", 3), ("ffn.3.", 5)]
    with pytest.raises(ValueError, match="not an expert uid"):
        split_uid("nope")


def test_a_coordinate_has_at_most_nine_digits():
    """No grid reaches 10**9 experts along one axis; a longer coordinate is no uid (a record naming one is
    dropped), so it never overflows an integer tensor nor Python's parsing of it."""
    assert is_valid_uid("ffn.999999999") and is_valid_uid("ffn.0.123456789")
    assert not is_valid_uid("ffn.1000000000") and not is_valid_uid("ffn.99999999999999999999")
    assert split_uid("ffn.999999999") == ("ffn", (999_999_999,))
    with pytest.raises(ValueError, match="not an expert uid"):
        split_uid("ffn." + "9" * 5000)
