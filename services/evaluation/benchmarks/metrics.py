"""Metrics and answer filters, ported from lm-evaluation-harness 0.4.13 (``lm_eval/api/metrics.py``,
``lm_eval/filters/extraction.py`` and ``tasks/bbh/zeroshot/utils.py``) so scores match lm-eval's."""

from __future__ import annotations

import collections
import math
import re
import string
import sys
import unicodedata
from collections.abc import Callable, Sequence

from services.evaluation.benchmarks.types import BenchmarkInfo, SampleScore

FALLBACK = "[invalid]"


# ----------------------------------------------------------------------------- exact match


def exact_match(
    prediction: str,
    reference: str,
    *,
    regexes_to_ignore: Sequence[str] = (),
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
) -> float:
    """lm-eval's ``exact_match_hf_evaluate`` for one pair: strip the regexes (in order), then case, then
    ASCII punctuation, and compare."""
    for pattern in regexes_to_ignore:
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return 1.0 if prediction == reference else 0.0


def truncate_at(text: str, until: Sequence[str]) -> str:
    """Cut a generation at the first stop sequence, as lm-eval's model backends do."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


# ----------------------------------------------------------------------------- filters
# A filter maps (response, doc) -> filtered answer; ``take_first`` is applied by the caller (texts[0]).

Filter = Callable[[str, dict], str]


def regex_filter(pattern: str, group_select: int = 0, fallback: str = FALLBACK) -> Filter:
    """lm-eval's ``regex`` filter (RegexFilter.apply)."""
    regex = re.compile(pattern)

    def apply(resp: str, doc: dict) -> str:
        if not isinstance(resp, str):
            resp = ""
        found = regex.findall(resp)
        if not found:
            return fallback
        match = found[group_select]
        if isinstance(match, tuple):
            parts = [m for m in match if m]
            match = parts[0] if parts else fallback
        return match.strip()

    return apply


_PUNCT_TABLE = dict.fromkeys(i for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P"))


class _Extended:
    """``ExtendedRegexFilter`` of lm-eval's BBH utils: ignores + a find_match that maps through a dict."""

    def __init__(
        self,
        pattern: str,
        group_select=0,
        fallback=FALLBACK,
        ignore_case=False,
        ignore_punctuation=False,
        regexes_to_ignore=None,
    ) -> None:
        self.regex = re.compile(pattern)
        self.group_select = group_select
        self.fallback = fallback
        self.ignore_case = ignore_case
        self.ignore_punctuation = ignore_punctuation
        self.regexes_to_ignore = regexes_to_ignore

    def filter_ignores(self, st: str) -> str:
        for s in self.regexes_to_ignore or ():
            st = re.sub(s, "", st)
        if self.ignore_case:
            st = st.lower()
        if self.ignore_punctuation:
            st = st.translate(_PUNCT_TABLE)
        return st

    def find_match(self, regex: re.Pattern, resp: str, convert: dict | None = None):
        match = regex.findall(resp)
        if match:
            match = match[self.group_select]
            if isinstance(match, tuple):
                match = [m for m in match if m][0]
            match = match.strip()
            if match and convert and match in convert:
                match = convert[match]
        return match


def multi_choice_regex_filter(pattern: str = r"(\([A-Z]\))", *, ignore_case=True, ignore_punctuation=True) -> Filter:
    """lm-eval's BBH ``MultiChoiceRegexFilter``: "(X)" in the answer, else the text of an option, else ": X"."""
    base = _Extended(pattern, ignore_case=ignore_case, ignore_punctuation=ignore_punctuation)

    def apply(resp: str, doc: dict) -> str:
        fallback_regexes, choice_to_alpha, letters, letter_to_target = [], {}, [], {}
        alpha = "A"
        for m in re.findall(r"\([A-Z]\)([^\n^(]*)", doc["input"]):
            m = base.filter_ignores(m.strip())
            fallback_regexes.append(re.escape(m))
            choice_to_alpha[m] = f"({alpha})"
            letters.append(alpha)
            letter_to_target[alpha] = f"({alpha})"
            alpha = chr(ord(alpha) + 1)
        fallback_regex = re.compile("|".join(sorted(fallback_regexes, key=len, reverse=True)))
        letter_regex = re.compile(rf":[\s]*({'|'.join(letters)})")
        match = base.find_match(base.regex, resp)
        if not match:
            match = base.find_match(fallback_regex, base.filter_ignores(resp), choice_to_alpha)
            if not match:
                match = base.find_match(letter_regex, resp, letter_to_target)
        return match or base.fallback

    return apply


def map_regex_filter(pattern_to_value: dict[str, str], *, ignore_case=True) -> Filter:
    """lm-eval's BBH ``MapRegexFilter``: the first alternative found, mapped to its value."""
    base = _Extended("|".join(pattern_to_value), ignore_case=ignore_case)
    compiled = {re.compile(p): v for p, v in pattern_to_value.items()}

    def apply(resp: str, doc: dict) -> str:
        whole = base.find_match(base.regex, base.filter_ignores(resp))
        match = None
        if whole:
            for regex, value in compiled.items():
                match = base.find_match(regex, base.filter_ignores(whole))
                if match:
                    match = value
                    break
        if not whole or not match:
            match = base.fallback
        return match

    return apply


_NUMBER_WORDS = (
    "((?:(?:zero|one|two|three|four|five|(?:twen|thir|for|fif|six|seven|nine)(?|teen|ty)|eight(?:|een|y)|ten|eleven|"
    "twelve|fourteen|hundred|thousand|(?:m|b|tr)illion)(?:zero|one|two|three|four|five|(?:twen|thir|for|fif|six|"
    "seven|nine)(?:|teen|ty)|eight(?|een|y)|ten|eleven|twelve|fourteen|hundred|thousand|(?:m|b|tr)illion|"
    "[^\\S\r\n]|,|and|&)+)?(?:zero|one|two|three|four|five|(?:twen|thir|for|fif|six|seven|nine)(?|teen|ty)|"
    "eight(?|een|y)|ten|eleven|twelve|fourteen|hundred|thousand|(?:m|b|tr)illion))"
)
_UNITS = {
    w: i
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
        ]
    )
}
_TENS = {
    w: 10 * i
    for i, w in enumerate(["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"])
    if i > 1
}
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000, "trillion": 1_000_000_000_000}


def words_to_number(text: str) -> int | None:
    """English number words to an int ("one hundred and five" -> 105), as ``word2number.w2n`` does for the
    phrases the BBH number regex extracts. None when a word is not a number word."""
    total, current = 0, 0
    words = [w for w in re.split(r"[\s,&-]+", text.lower()) if w and w != "and"]
    if not words:
        return None
    for w in words:
        if w in _UNITS:
            current += _UNITS[w]
        elif w in _TENS:
            current += _TENS[w]
        elif w == "hundred":
            current = max(current, 1) * 100
        elif w in _SCALES:
            total += max(current, 1) * _SCALES[w]
            current = 0
        else:
            return None
    return total + current


def number_parse_regex_filter(pattern: str = r"([-0-9]+)") -> Filter:
    """lm-eval's BBH ``NumberParseRegexFilter``: digits, else English number words (word2number)."""
    import regex as regex_module  # branch-reset groups "(?|..)" need the regex module, as in lm-eval

    base = _Extended(pattern)
    words = regex_module.compile(_NUMBER_WORDS)

    def apply(resp: str, doc: dict) -> str:
        match = base.find_match(base.regex, resp)
        if not match:
            match = base.find_match(words, resp.lower())
            if match:
                value = words_to_number(match)
                match = str(value) if value is not None else None
        return match or base.fallback

    return apply


def word_sort_filter(resp: str, doc: dict) -> str:
    """lm-eval's BBH ``WordSortFilter``: the listed words in the order of their last mention."""
    words = doc["input"].split("List:")[1].strip().split()
    regex = re.compile("|".join(f"\\b{re.escape(w)}\\b" for w in words))
    match = regex.findall(resp)
    match.reverse()
    ordered = reversed(collections.OrderedDict(zip(match, [None] * len(match), strict=True)))
    return " ".join(ordered)


def take_first(resp: str, doc: dict) -> str:
    return resp


# ----------------------------------------------------------------------------- multiple choice


def argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (numpy.argmax)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mc_scores(lls: Sequence[float], choice_texts: Sequence[str], gold: int | list[int]) -> dict[str, float]:
    """lm-eval's multiple_choice process_results: acc on raw loglikelihoods, acc_norm on loglikelihood per
    character of the bare choice (``len(choice)``)."""
    pred = argmax(lls)
    pred_norm = argmax([ll / float(len(c)) for ll, c in zip(lls, choice_texts, strict=True)])
    golds = gold if isinstance(gold, list) else [gold]
    return {"acc": 1.0 if pred in golds else 0.0, "acc_norm": 1.0 if pred_norm in golds else 0.0}


def mc2_score(lls: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2 (lm-eval ``process_results_mc2``): normalised probability mass of the true answers."""
    probs = [math.exp(ll) for ll in lls]
    total = sum(probs)
    if total == 0.0:  # every loglikelihood underflowed: shift by the max first
        top = max(lls)
        probs = [math.exp(ll - top) for ll in lls]
        total = sum(probs)
    return sum(p for p, lab in zip(probs, labels, strict=True) if lab == 1) / total


# ----------------------------------------------------------------------------- code


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (HumanEval paper; HF ``code_eval``): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# ----------------------------------------------------------------------------- aggregation


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation (n - 1) over sqrt(n); 0 for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return 0.0
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def aggregate(info: BenchmarkInfo, scores: list[SampleScore]) -> dict[str, tuple[float, float]]:
    """metric -> (mean over samples, stderr of the mean), for every metric in ``info.metrics`` that the samples
    report (pass@k means over problems, as lm-eval and HumanEval do). Empty input gives an empty dict."""
    out: dict[str, tuple[float, float]] = {}
    names = list(info.metrics) + sorted({m for s in scores for m in s.metrics} - set(info.metrics))
    for name in names:
        values = [s.metrics[name] for s in scores if name in s.metrics]
        if values:
            out[name] = (mean(values), mean_stderr(values))
    return out
