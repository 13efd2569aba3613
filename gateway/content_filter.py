"""Blocked-term content filter (settings ``blocked_terms``, case-insensitive).

A prompt containing a term is refused (400, code ``content_filter``); an output is cut before the
first term and its choice finishes with ``content_filter`` (the stream stops there).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from services.core.errors import FieldViolation, InvalidArgument


class OutputFilter:
    """Watches one choice's text as it streams."""

    def __init__(self, pattern: re.Pattern | None, longest: int) -> None:
        self._pattern = pattern
        self._longest = longest
        self._text = ""
        self.blocked = False

    def feed(self, delta: str) -> str:
        """The part of ``delta`` that may be sent; sets ``blocked`` when a term starts in it."""
        if self._pattern is None or self.blocked or not delta:
            return "" if self.blocked else delta
        start = len(self._text)
        self._text += delta
        match = self._pattern.search(self._text, max(0, start - self._longest + 1))
        if match is None:
            return delta
        self.blocked = True
        return delta[: max(0, match.start() - start)]


class ContentFilter:
    def __init__(self, terms: Iterable[str]) -> None:
        terms = sorted({t for t in terms if t}, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(t) for t in terms), re.IGNORECASE) if terms else None
        self._longest = max((len(t) for t in terms), default=0)

    def check_prompt(self, texts: Iterable[str], param: str) -> None:
        if self._pattern is None:
            return
        for text in texts:
            if self._pattern.search(text):
                description = "the prompt contains blocked content"
                raise InvalidArgument(
                    f"{param}: {description}", reason="CONTENT_FILTER", violations=[FieldViolation(param, description)]
                )

    def output(self) -> OutputFilter:
        return OutputFilter(self._pattern, self._longest)
