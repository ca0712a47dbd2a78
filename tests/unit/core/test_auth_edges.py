"""The swarm key's rules at their edges (dmoe.core.auth): a key of 16 bytes is long enough and 15 is
not; keys made by ``generate`` are 32 random bytes in a file only its owner reads; a call token is
``time.nonce.tag`` with a 12-byte nonce and passes the default 60 s clock check up to exactly 60 s;
its nonce is remembered while the token could pass and forgotten after; a token in bytes, or among
other metadata, is read as well."""

from __future__ import annotations

import logging
import stat

import pytest

from dmoe.core.auth import METADATA_KEY, CallVerifier, Nonces, SwarmKey, fullmethod, load_key
from dmoe.errors import ConfigError

pytestmark = pytest.mark.timeout(30)
FORWARD = "/dmoe.ExpertService/Forward"


def test_sixteen_bytes_is_the_shortest_key():
    assert len(SwarmKey(b"s" * 16).fingerprint) == 12
    with pytest.raises(ConfigError, match="at least 16 bytes, got 15"):
        SwarmKey(b"s" * 15)
    assert SwarmKey(b"a" * 16).fingerprint != SwarmKey(b"b" * 16).fingerprint


def test_a_generated_key_is_32_bytes_in_a_file_only_its_owner_reads(tmp_path, caplog):
    path = tmp_path / "swarm.key"
    key = SwarmKey.generate(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.endswith("\n") and len(bytes.fromhex(text.strip())) == 32
    with caplog.at_level(logging.WARNING, logger="dmoe.core.auth"):
        loaded = load_key(str(path))
    assert caplog.records == [] and loaded is not None and loaded.fingerprint == key.fingerprint
    with pytest.raises(ConfigError, match="exists already"):
        SwarmKey.generate(path)
    assert path.read_text() == text
    assert load_key(None) is None and load_key("") is None


@pytest.mark.parametrize("mode,warns", [(0o600, False), (0o400, False), (0o640, True), (0o604, True),
                                        (0o610, True), (0o601, True)])
def test_a_key_file_others_can_use_is_warned_about(tmp_path, caplog, mode, warns):
    path = tmp_path / "k"
    path.write_text("ab" * 16)
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="dmoe.core.auth"):
        SwarmKey.load(path)
    assert [r.getMessage() for r in caplog.records] == (
        [f"swarm key {path} is readable by other users of this machine: chmod 600 it"] if warns else [])


def test_a_token_is_time_nonce_tag(monkeypatch):
    monkeypatch.setattr("dmoe.core.auth.time.time", lambda: 1_000_000.25)
    ((name, token),) = SwarmKey(b"k" * 32).call_metadata(FORWARD)
    seconds, fraction, nonce, tag = token.split(".")
    assert name == METADATA_KEY == "dmoe-auth" and (seconds, fraction) == ("1000000", "250")
    assert len(bytes.fromhex(nonce)) == 12 and len(bytes.fromhex(tag)) == 32
    assert fullmethod("dmoe.ExpertService", "Forward") == FORWARD


def test_the_default_clock_check_passes_exactly_sixty_seconds(monkeypatch):
    start = 1_000_000.0
    now = [start]
    monkeypatch.setattr("dmoe.core.auth.time.time", lambda: now[0])
    key = SwarmKey(b"k" * 32)
    verifier = CallVerifier(key)
    early, late = key.call_metadata(FORWARD), key.call_metadata(FORWARD)
    now[0] = start + 60.0
    assert verifier.check(FORWARD, early) is None
    now[0] = start + 60.5
    assert verifier.check(FORWARD, late) == ("token time is +60s off this node's clock (more than 60s): "
                                             "sync clocks")
    ahead, further = key.call_metadata(FORWARD), key.call_metadata(FORWARD)  # sent at start + 60.5
    now[0] = start + 0.5
    assert verifier.check(FORWARD, ahead) is None  # sent 60 s ahead of this clock: still fine
    now[0] = start
    assert verifier.check(FORWARD, further).startswith("token time is -60s off")


def test_a_nonce_is_kept_while_its_token_could_pass_and_forgotten_after(monkeypatch):
    now = [1_000_000.0]
    monkeypatch.setattr("dmoe.core.auth.time.time", lambda: now[0])
    key = SwarmKey(b"k" * 32)
    verifier = CallVerifier(key, max_skew=10)
    token = key.call_metadata(FORWARD)
    assert verifier.check(FORWARD, token) is None
    now[0] += 10.0  # the last moment the token passes the clock check: still a replay
    assert verifier.check(FORWARD, token) == "token already used (a replayed call)"
    assert len(verifier._seen) == 1
    now[0] += 1.0  # kept one second past that (10 + 1 after it was sent)
    assert verifier.check(FORWARD, key.call_metadata(FORWARD)) is None and len(verifier._seen) == 2
    now[0] += 0.5
    assert verifier.check(FORWARD, key.call_metadata(FORWARD)) is None and len(verifier._seen) == 2


def test_nonces_are_forgotten_in_order_once_past_their_time():
    nonces = Nonces()
    assert nonces.add("a", forget_at=10.0, now=0.0) and nonces.add("b", forget_at=20.0, now=0.0)
    assert not nonces.add("a", forget_at=30.0, now=10.0)  # at its time it is still known
    assert len(nonces) == 2
    assert nonces.add("c", forget_at=30.0, now=10.5) and len(nonces) == 2  # "a" forgotten
    assert nonces.add("a", forget_at=40.0, now=10.5) and len(nonces) == 3


def test_a_token_in_bytes_or_among_other_metadata_is_read():
    key = SwarmKey(b"k" * 32)
    verifier = CallVerifier(key)
    ((name, token),) = key.call_metadata(FORWARD)
    assert verifier.check(FORWARD, (("x-other", "1.2.3.4"), (name, token.encode()))) is None
    ((name, token),) = key.call_metadata(FORWARD)
    assert verifier.check(FORWARD, ((name, token), ("x-other", "junk"))) is None
    ((name, token),) = key.call_metadata(FORWARD)
    assert verifier.check(FORWARD, (("authorization", "junk"), (name, token))) is None  # a key before ours
    assert verifier.check(FORWARD, (("x-other", token),)).startswith("this node serves a private swarm")
    assert verifier.check(FORWARD, ((name, "1.2.ab.fg"),)) == "malformed dmoe-auth token"
    assert verifier.check(FORWARD, ((name, "1.2.3.4.5"),)) == "malformed dmoe-auth token"
