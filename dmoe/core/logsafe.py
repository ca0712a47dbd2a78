"""printable: peer-controlled text made safe for a log line.

Whatever a peer chooses (a uid in a request, a record's fields, a remote node's error message, a
relay's reply, grpc's peer string) may hold newlines, which forge log lines, or terminal escapes
(``\\x1b[...``), which rewrite what an operator's terminal shows. Log such text through
:func:`printable`: control and other non-printable characters come out escaped (``\\n``, ``\\x1b``,
``\\u202e``) and long text is cut.
"""

from __future__ import annotations

LIMIT = 200  # characters kept by default


def printable(value: object, limit: int = LIMIT) -> str:
    """``str(value)`` with every non-printable character escaped as Python writes it, cut to
    ``limit`` characters (and a note of how many were left out)."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if cut <= 0 else f"{text}...(+{cut} characters)"
