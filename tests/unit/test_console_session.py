"""The console's signed session tokens (gateway/console/session.py): what verifies and what does not."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from gateway.console.session import Session, SessionSigner

SECRET = b"unit-test-secret"
NOW = 1_800_000_000.0
# A complete session payload (without the version), as a signer writes it.
FIELDS = {
    "sid": "x",
    "kind": "admin",
    "subject": "admin",
    "name": "admin",
    "key_prefix": "",
    "issued_at": 1,
    "expires_at": int(NOW) + 60,
    "playground_key": "key_1",
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(body: str, secret: bytes = SECRET) -> str:
    """A token with a valid MAC over any body (what only a holder of the secret can make)."""
    return f"{body}.{b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())}"


@pytest.fixture
def signer() -> SessionSigner:
    return SessionSigner(SECRET, ttl_s=3600)


def test_a_signed_session_verifies_to_the_same_session(signer):
    session = signer.new_session("key", "key_0123", "alice ünïcode", "sk-yard-abcdef", now=NOW)
    token = signer.sign(session)
    assert signer.verify(token, now=NOW + 1) == session
    assert session.expires_at == int(NOW) + 3600 and session.kind == "key" and session.playground_key == ""


def test_the_token_is_url_safe_and_carries_no_secret(signer):
    token = signer.sign(signer.new_session("admin", "admin", "admin", now=NOW))
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert payload["v"] == 1 and payload["kind"] == "admin"
    assert SECRET.decode() not in token


def test_an_expired_session_does_not_verify(signer):
    session = signer.new_session("admin", "admin", "admin", now=NOW)
    token = signer.sign(session)
    assert signer.verify(token, now=session.expires_at - 1) is not None
    assert signer.verify(token, now=session.expires_at) is None
    assert signer.verify(token, now=session.expires_at + 10_000) is None


def test_a_changed_payload_does_not_verify(signer):
    session = signer.new_session("key", "key_0123", "alice", "sk-yard-abc", now=NOW)
    body, mac = signer.sign(session).split(".")
    data = json.loads(base64.urlsafe_b64decode(body + "=="))
    data["kind"], data["subject"] = "admin", "admin"  # promote itself to admin
    forged = b64(json.dumps(data, separators=(",", ":"), sort_keys=True).encode())
    assert signer.verify(f"{forged}.{mac}", now=NOW) is None
    later = dict(json.loads(base64.urlsafe_b64decode(body + "==")), expires_at=int(NOW) + 10**9)  # extend itself
    assert signer.verify(f"{b64(json.dumps(later).encode())}.{mac}", now=NOW) is None


def test_a_changed_mac_does_not_verify(signer):
    token = signer.sign(signer.new_session("admin", "admin", "admin", now=NOW))
    body, mac = token.split(".")
    flipped = ("A" if mac[0] != "A" else "B") + mac[1:]
    assert signer.verify(f"{body}.{flipped}", now=NOW) is None
    assert signer.verify(f"{body}.", now=NOW) is None


def test_another_secret_does_not_verify(signer):
    token = signer.sign(signer.new_session("admin", "admin", "admin", now=NOW))
    assert SessionSigner(b"other-secret", ttl_s=3600).verify(token, now=NOW) is None
    assert SessionSigner("unit-test-secret", ttl_s=3600).verify(token, now=NOW) is not None  # str secrets too


def test_signers_without_a_secret_make_their_own(signer):
    first, second = SessionSigner(None, ttl_s=60), SessionSigner(None, ttl_s=60)
    token = first.sign(first.new_session("admin", "admin", "admin", now=NOW))
    assert first.verify(token, now=NOW) is not None
    assert second.verify(token, now=NOW) is None


@pytest.mark.parametrize(
    "token",
    [
        None,
        "",
        "no-dot",
        "a.b.c",
        "!!!.###",
        ".",
    ],
)
def test_malformed_tokens_do_not_verify(signer, token):
    assert signer.verify(token, now=NOW) is None


@pytest.mark.parametrize(
    "body",
    [
        b64(b"not json"),
        b64(b"[1, 2, 3]"),
        b64(b'"a string"'),
        b64(b"null"),
        b64(json.dumps({"v": 2, "sid": "x"}).encode()),  # another version
        b64(json.dumps({"v": 1, "sid": "x"}).encode()),  # fields missing
        b64(json.dumps({"sid": "x"}).encode()),  # no version
        b64(json.dumps({"v": 1, **FIELDS, "extra": 1}).encode()),  # unknown field
        b64(json.dumps({"v": 1, **FIELDS, "expires_at": "never"}).encode()),  # not a time
        "%%%",  # not base64
    ],
)
def test_well_signed_garbage_does_not_verify(signer, body):
    assert signer.verify(signed(body), now=NOW) is None


def test_a_well_signed_complete_payload_verifies(signer):
    body = b64(json.dumps({"v": 1, **FIELDS}).encode())
    assert signer.verify(signed(body), now=NOW) == Session(**FIELDS)


def test_the_playground_key_is_part_of_the_signed_session(signer):
    session = signer.new_session("admin", "admin", "admin", now=NOW)
    updated = session.with_playground_key("key_abc")
    assert updated.sid == session.sid and updated.playground_key == "key_abc"
    assert signer.verify(signer.sign(updated), now=NOW) == updated
    assert signer.sign(updated) != signer.sign(session)


def test_a_ttl_must_be_positive():
    with pytest.raises(ValueError, match="ttl_s"):
        SessionSigner(SECRET, ttl_s=0)
