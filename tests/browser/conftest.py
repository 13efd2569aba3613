"""Fixtures of the console's browser tests: Debian's Chromium driven by Playwright (never a downloaded browser;
the tests skip without /usr/bin/chromium) and the stack of console_stack.py, both once per module."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.core.settings import S3Settings

from .console_stack import ARTIFACTS, CHROMIUM, ConsoleStack, console_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server) -> Iterator[ConsoleStack]:
    s3 = S3Settings(endpoint=s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                    bucket=f"t-{uuid.uuid4().hex[:12]}", connect_retries=2, retry_backoff_s=0.05)  # fmt: skip
    with console_stack(tmp_path_factory.mktemp("console"), s3) as console:
        yield console


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, stack) -> Iterator[Any]:
    """A fresh browser context (no cookies, empty sessionStorage) and page; console errors are collected in
    ``page.console_errors``."""
    context = browser.new_context(base_url=stack.url, viewport={"width": 1360, "height": 900})
    context.set_default_timeout(20_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.console_errors = errors
    try:
        yield pg
    finally:
        context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
