"""Plain data types of the benchmark library: what the evaluation job passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BenchmarkInfo:
    """Catalogue entry of one runnable benchmark name."""

    name: str
    display_name: str
    description: str
    kind: str  # "multiple_choice" | "generation" | "code"
    metrics: list[str]  # primary first
    options: dict[str, str]  # option name -> what it does (and its default)
    num_samples: int  # 0: unknown until loaded
    default_num_fewshot: int
    source: str  # "bundled" | "hub"


@dataclass
class DataSource:
    """Where benchmark data comes from and where hub downloads are cached."""

    cache_dir: Path
    hf_endpoint: str = "https://huggingface.co"
    hf_token: str | None = None
    modelscope_endpoint: str = "https://modelscope.cn"
    hub: str = "auto"  # auto | bundled | hf | modelscope
    offline: bool = False  # never send a request; only bundled data and the cache


@dataclass
class Docs:
    test: list[dict]
    fewshot: list[dict] = field(default_factory=list)


@dataclass
class MCRequest:
    """Score ``context + continuation`` for every choice (loglikelihood of the continuation)."""

    doc_id: str
    context: str
    continuations: list[str]  # target delimiter already prepended (none in chat mode, as lm-eval)
    gold: int | list[int]
    choice_texts: list[str]  # the bare choices; acc_norm divides by their length in characters (lm-eval)
    messages: list[dict] | None = None  # chat mode: the context as messages


@dataclass
class GenRequest:
    doc_id: str
    prompt: str
    messages: list[dict] | None
    until: list[str]
    max_tokens: int
    n: int = 1
    temperature: float = 0.0
    reference: str = ""
    # Image references the messages carry (``{"type": "image", "image": REF}`` parts), in order: the job
    # resolves them to bytes right before sending (``messages`` then hold ``{"type": "image", "data",
    # "mime_type"}`` parts). Image requests always go as chat: a completion prompt cannot carry an image.
    images: list[str] = field(default_factory=list)


@dataclass
class MCResult:
    loglikelihoods: list[float]
    is_greedy: list[bool]


@dataclass
class GenResult:
    texts: list[str]


@dataclass
class SampleScore:
    doc_id: str
    metrics: dict[str, float]
    prediction: str
    reference: str
    prompt: str
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RowIssue:
    """One bad row of a user's set: 1-based row number, the field at fault and why."""

    row: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.field}: {self.reason}"
