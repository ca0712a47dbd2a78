"""printable: peer text made safe for a log line."""

from __future__ import annotations

import pytest

from dmoe.core.logsafe import printable

pytestmark = pytest.mark.timeout(30)


def test_control_characters_are_escaped_and_long_text_is_cut():
    assert printable("ffn.0") == "ffn.0" and printable("node-1 at [::1]:80") == "node-1 at [::1]:80"
    assert printable("a\nb\r\x1b[31mc\x00\x7f\x9b") == "a\\nb\\r\\x1b[31mc\\x00\\x7f\\x9b"
    assert printable("\u202eevil\u2028x") == "\\u202eevil\\u2028x"  # bidi override, line separator
    assert printable("ünïcode ok €") == "ünïcode ok €"
    assert printable("\ud800") == "\\ud800"  # a lone surrogate would break a UTF-8 log file
    assert printable("x" * 250) == "x" * 200 + "...(+50 characters)"
    assert printable("\n" * 10, limit=3) == "\\n\\n\\n...(+7 characters)"
    assert printable(ValueError("bad\nthing")) == "bad\\nthing" and printable(b"\x1b") == "b'\\x1b'"
