"""Gateway pieces on their own: quota windows, the content filter, error mapping, settings."""

from __future__ import annotations

import pytest

from gateway.app import _param
from gateway.auth.keys import ApiKey
from gateway.content_filter import ContentFilter
from gateway.errors import RateLimited, error_body
from gateway.quota import QuotaLimiter
from gateway.settings import GatewaySettings
from services.core.db import utcnow
from services.core.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable


def key(rpm: int = 0, tpm: int = 0) -> ApiKey:
    return ApiKey(id="key_t", name="t", prefix="sk-yard-x", rpm=rpm, tpm=tpm, created_at=utcnow())


def test_rpm_window_refuses_then_frees_after_a_minute():
    limiter, k = QuotaLimiter(), key(rpm=2)
    limiter.reserve(k, 1, now=0.0)
    limiter.reserve(k, 1, now=10.0)
    with pytest.raises(RateLimited) as err:
        limiter.reserve(k, 1, now=20.0)
    assert err.value.headers["retry-after"] == "40"  # the first request leaves the window at t=60
    assert err.value.headers["x-ratelimit-remaining-requests"] == "0"
    limiter.reserve(k, 1, now=60.5)


def test_tokens_are_reserved_then_settled_to_real_usage():
    limiter, k = QuotaLimiter(), key(tpm=100)
    first = limiter.reserve(k, 90, now=0.0)
    with pytest.raises(RateLimited) as err:
        limiter.reserve(k, 20, now=1.0)
    assert err.value.metadata["limit"] == "tokens"
    first.settle(10)
    second = limiter.reserve(k, 20, now=2.0)
    assert second.headers["x-ratelimit-remaining-tokens"] == "70"
    with pytest.raises(RateLimited, match="Request too large"):
        limiter.reserve(k, 101, now=3.0)


def test_settling_an_expired_reservation_does_not_corrupt_the_window():
    limiter, k = QuotaLimiter(), key(tpm=100)
    old = limiter.reserve(k, 50, now=0.0)
    limiter.reserve(k, 10, now=61.0)  # prunes the first
    old.settle(5)
    assert limiter.reserve(k, 90, now=62.0).headers["x-ratelimit-remaining-tokens"] == "0"


def test_unlimited_keys_carry_no_headers():
    assert QuotaLimiter().reserve(key(), 10_000).headers == {}


def test_output_filter_cuts_before_a_term_split_over_chunks():
    out = ContentFilter(["secret plan"]).output()
    assert out.feed("the Sec") == "the Sec" and not out.blocked
    assert out.feed("RET PLAN is") == "" and out.blocked
    assert out.feed("more") == ""
    clean = ContentFilter([]).output()
    assert clean.feed("anything secret plan") == "anything secret plan"


def test_prompt_filter_names_the_param():
    with pytest.raises(InvalidArgument) as err:
        ContentFilter(["bad"]).check_prompt(["fine", "so BAD"], "messages")
    assert err.value.reason == "CONTENT_FILTER" and err.value.violations[0].field == "messages"


@pytest.mark.parametrize("err, status, body", [
    (InvalidArgument.for_field("n", "must be >= 1"), 400,
     {"message": "n: must be >= 1", "type": "invalid_request_error", "param": "n", "code": None}),
    (NotFound("gone", reason="MODEL_NOT_FOUND"), 404,
     {"message": "gone", "type": "invalid_request_error", "param": None, "code": "model_not_found"}),
    (Unavailable("UNAVAILABLE", reason="UNAVAILABLE"), 503,
     {"message": "UNAVAILABLE", "type": "server_error", "param": None, "code": "service_unavailable"}),
    (DeadlineExceeded("slow"), 504, {"message": "slow", "type": "server_error", "param": None, "code": "timeout"}),
])
def test_domain_errors_map_to_openai_errors(err, status, body):
    assert error_body(err) == (status, {"error": body})


def test_validation_locations_become_openai_params():
    assert _param(("body", "temperature")) == "temperature"
    assert _param(("body", "messages", 0, "role")) == "messages[0].role"
    assert _param(("body", "stop", "list[str]", 4)) == "stop[4]"
    assert _param(("body",)) is None


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("YARD_GATEWAY_INFERENCE_ADDR", "a:1, b:2")
    monkeypatch.setenv("YARD_GATEWAY_BLOCKED_TERMS", "x, y z")
    monkeypatch.setenv("YARD_GATEWAY_AUTH__REQUIRED", "false")
    monkeypatch.setenv("YARD_GATEWAY_HTTP__PORT", "8123")
    s = GatewaySettings()
    assert s.inference_addrs == ["a:1", "b:2"] and s.blocked_terms == ["x", "y z"]
    assert s.auth.required is False and s.http.port == 8123
    monkeypatch.setenv("YARD_GATEWAY_BLOCKED_TERMS", '["a,b"]')
    assert GatewaySettings().blocked_terms == ["a,b"]
