"""Expert uids and the patterns that name grids of them.

A uid is ``prefix.i[.j...]``: a name that does not start with a digit, then one or more integer
grid coordinates (``ffn.3``, ``layer0_ffn.12.7``). A pattern replaces coordinates with ranges:
``ffn.[0:8]`` names ffn.0 .. ffn.7 and ``ffn.[0:4].[0:16]`` a 4 x 16 grid.
"""

from __future__ import annotations

import collections
import itertools
import re

UID_DELIMITER = "."
_PREFIX = r"[A-Za-z_][A-Za-z0-9_\-]*"
MAX_COORD_DIGITS = 9  # a grid coordinate is below 10**9: no grid is that large, and it fits any integer type
_COORD = rf"(?:0|[1-9][0-9]{{0,{MAX_COORD_DIGITS - 1}}})"
UID_RE = re.compile(rf"^{_PREFIX}(?:\.{_COORD})+$")
_PATTERN_PART = re.compile(rf"^(?:{_COORD}|\[({_COORD}):({_COORD})\])$")
MAX_PATTERN_EXPERTS = 1 << 20


def is_valid_uid(uid: str) -> bool:
    return bool(UID_RE.match(uid))


def split_uid(uid: str) -> tuple[str, tuple[int, ...]]:
    """'ffn.3.5' -> ('ffn', (3, 5))."""
    if not is_valid_uid(uid):
        raise ValueError(f"{uid!r} is not an expert uid: expected prefix.i[.j...], e.g. 'ffn.3'")
    prefix, *coords = uid.split(UID_DELIMITER)
    return prefix, tuple(int(c) for c in coords)


def expand_pattern(pattern: str) -> list[str]:
    """'ffn.[0:2].[0:2]' -> ['ffn.0.0', 'ffn.0.1', 'ffn.1.0', 'ffn.1.1']; a plain uid -> [uid]."""
    prefix, *parts = pattern.strip().split(UID_DELIMITER)
    if not re.fullmatch(_PREFIX, prefix) or not parts:
        raise ValueError(f"bad expert pattern {pattern!r}: expected e.g. 'ffn.[0:8]' or 'ffn.[0:4].[0:16]'")
    ranges: list[range] = []
    for part in parts:
        match = _PATTERN_PART.match(part)
        if not match:
            raise ValueError(f"bad expert pattern {pattern!r}: {part!r} is neither an index nor [start:stop]")
        if match.group(1) is None:
            ranges.append(range(int(part), int(part) + 1))
        else:
            start, stop = int(match.group(1)), int(match.group(2))
            if stop <= start:
                raise ValueError(f"bad expert pattern {pattern!r}: empty range [{start}:{stop}]")
            ranges.append(range(start, stop))
    total = 1
    for r in ranges:
        total *= len(r)
    if total > MAX_PATTERN_EXPERTS:
        raise ValueError(f"expert pattern {pattern!r} names {total} experts; at most {MAX_PATTERN_EXPERTS}")
    return [UID_DELIMITER.join([prefix, *map(str, coords)]) for coords in itertools.product(*ranges)]


def expand_patterns(patterns: list[str]) -> list[str]:
    """Expand several patterns; a uid named twice is an error."""
    uids: list[str] = []
    for pattern in patterns:
        uids.extend(expand_pattern(pattern))
    duplicates = sorted(uid for uid, count in collections.Counter(uids).items() if count > 1)
    if duplicates:
        raise ValueError(f"expert uid(s) named twice: {', '.join(duplicates[:5])}")
    return uids
