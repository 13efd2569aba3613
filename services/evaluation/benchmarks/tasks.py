"""Benchmark definitions: prompts, choices, targets, filters and metrics of lm-evaluation-harness 0.4.13's task
YAMLs (quoted next to each definition), plus ``bbh_mc``, a multiple-choice variant of BBH that is ours.

How lm-eval assembles a prompt (``ConfigurableTask.fewshot_context`` / ``build_qa_turn``), mirrored by
:func:`render`: ``description + sum(doc_to_text(shot) + target_delimiter + target(shot) + fewshot_delimiter) +
doc_to_text(doc)`` with target_delimiter " " and fewshot_delimiter "\\n\\n". In chat mode (lm-eval's
``--apply_chat_template`` without multi-turn few-shot) the description is the system message and the rest one user
message; multiple-choice continuations then carry no target delimiter.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

from services.core.errors import FailedPrecondition, InvalidArgument
from services.evaluation.benchmarks import metrics as M
from services.evaluation.benchmarks.hub import Split, load_split
from services.evaluation.benchmarks.types import (
    BenchmarkInfo,
    DataSource,
    Docs,
    GenRequest,
    GenResult,
    MCRequest,
    MCResult,
    SampleScore,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's generate_until default (max_gen_toks)
LETTERS4 = ["A", "B", "C", "D"]


def render(description: str, shots: list[tuple[str, str]], query: str, *, chat: bool) -> tuple[str, list[dict] | None]:
    """The prompt text lm-eval builds, and (chat mode) its messages: [system: description] + [user: the rest]."""
    body = "".join(q + TARGET_DELIMITER + a + FEWSHOT_DELIMITER for q, a in shots) + query
    if not chat:
        return description + body, None
    messages = ([{"role": "system", "content": description}] if description else []) + [
        {"role": "user", "content": body}
    ]
    return description + body, messages


# ----------------------------------------------------------------------------- options


def _int_option(options: dict[str, str], key: str, default: int, field: str, *, minimum: int = 0) -> int:
    raw = options.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise InvalidArgument.for_field(f"{field}.options.{key}", f"must be an integer, got {raw!r}") from None
    if value < minimum:
        raise InvalidArgument.for_field(f"{field}.options.{key}", f"must be >= {minimum}, got {value}")
    return value


def _float_option(options: dict[str, str], key: str, default: float, field: str) -> float:
    raw = options.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise InvalidArgument.for_field(f"{field}.options.{key}", f"must be a number, got {raw!r}") from None
    if value < 0:
        raise InvalidArgument.for_field(f"{field}.options.{key}", f"must be >= 0, got {value}")
    return value


def _choice_option(options: dict[str, str], key: str, allowed: tuple[str, ...], field: str) -> str:
    value = str(options.get(key) or allowed[0]).strip()
    if value not in allowed:
        raise InvalidArgument.for_field(f"{field}.options.{key}", f"must be one of {', '.join(allowed)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- base


class Benchmark:
    """One runnable benchmark. ``load`` -> ``fewshot_examples`` + ``build`` per doc -> ``score`` per result."""

    info: BenchmarkInfo
    sampler = "default"  # lm-eval fewshot sampler: "default" (seeded random) or "first_n"
    exclude_eval_doc = False  # lm-eval drops the doc itself from its shots only when fewshot split == test split
    bundled = False

    def __init__(self, info: BenchmarkInfo, options: dict[str, str] | None = None, *, field: str = "benchmark"):
        self.info = info
        self.options = dict(options or {})
        self.field = field
        self.num_fewshot = _int_option(self.options, "num_fewshot", info.default_num_fewshot, field)
        self.source = (
            _choice_option(self.options, "source", ("auto", "bundled", "hub"), field) if self.bundled else "hub"
        )
        self._draws: dict[tuple, tuple[random.Random, list[list[dict]]]] = {}
        self._positions: dict[int, tuple[int, dict[int, int]]] = {}

    # --- data
    def load(self, data: DataSource) -> Docs:
        """Eval docs (and few-shot pool when num_fewshot > 0) from the bundled copy or the hub."""
        if self.bundled and self.source != "hub":
            return self._load_bundled()
        if self.source == "bundled" or data.hub == "bundled":
            raise FailedPrecondition(
                f"{self.info.name}: no bundled data; it loads from a dataset hub", reason="BENCHMARK_NOT_BUNDLED"
            )
        return self._load_hub(data)

    def _load_bundled(self) -> Docs:  # pragma: no cover - overridden where bundled
        raise NotImplementedError

    def _load_hub(self, data: DataSource) -> Docs:
        raise NotImplementedError

    # --- few-shot
    def fewshot_pool(self, docs: Docs, doc: dict) -> list[dict]:
        return docs.fewshot

    def fewshot_examples(self, docs: Docs, doc: dict, k: int, *, seed: int = 1234) -> list[dict]:
        """lm-eval's sampler. ``first_n``: the first k of the pool. ``default``: one ``random.Random(seed)`` drawing
        ``sample(pool, k)`` per eval doc in order, so the shots of the i-th doc of ``docs.test`` are lm-eval's
        (``--fewshot_seed``, default 1234)."""
        if k <= 0:
            return []
        pool = self.fewshot_pool(docs, doc)
        if self.exclude_eval_doc:
            pool = [d for d in pool if d != doc]
        if len(pool) < k:
            raise InvalidArgument.for_field(
                f"{self.field}.options.num_fewshot",
                f"{self.info.name} has {len(pool)} few-shot examples, {k} asked"
                + ("" if pool or docs.fewshot else " (load() fetches the few-shot split only when num_fewshot > 0)"),
            )
        if self.sampler == "first_n":
            return pool[:k]
        index = self._position(docs, doc)
        key = (id(docs), seed, k, self._pool_key(doc))
        rnd, draws = self._draws.setdefault(key, (random.Random(seed), []))
        base = self.fewshot_pool(docs, doc)
        while len(draws) <= index:
            if self.exclude_eval_doc:  # lm-eval: sample k + 1, drop the eval doc, keep k
                target = docs.test[len(draws)]
                got = [d for d in rnd.sample(base, k + 1) if d != target][:k]
            else:
                got = rnd.sample(base, k)
            draws.append(got)
        return list(draws[index])

    def _pool_key(self, doc: dict) -> str:
        return ""

    def _position(self, docs: Docs, doc: dict) -> int:
        cached = self._positions.get(id(docs))
        if cached is None or cached[0] != len(docs.test):
            cached = (len(docs.test), {id(d): i for i, d in enumerate(docs.test)})
            self._positions[id(docs)] = cached
        pos = cached[1].get(id(doc))
        if pos is None:
            try:
                pos = docs.test.index(doc)
            except ValueError:
                pos = 0
        return pos

    # --- prompts
    def description(self, doc: dict) -> str:
        return ""

    def doc_to_text(self, doc: dict) -> str:
        raise NotImplementedError

    def target_text(self, doc: dict) -> str:
        """The answer as it appears after a few-shot question."""
        raise NotImplementedError

    def _render(self, doc: dict, fewshot: list[dict], chat: bool) -> tuple[str, list[dict] | None]:
        shots = [(self.doc_to_text(s), self.target_text(s)) for s in fewshot]
        return render(self.description(doc), shots, self.doc_to_text(doc), chat=chat)

    def doc_id(self, doc: dict, index: int) -> str:
        return str(index)

    def build(self, doc: dict, index: int, fewshot: list[dict], *, chat: bool) -> MCRequest | GenRequest:
        raise NotImplementedError

    def score(self, doc: dict, request, result) -> SampleScore:
        raise NotImplementedError


# ----------------------------------------------------------------------------- multiple choice


class MultipleChoice(Benchmark):
    def doc_to_choice(self, doc: dict) -> list[str]:
        raise NotImplementedError

    def gold(self, doc: dict) -> int | list[int]:
        raise NotImplementedError

    def target_text(self, doc: dict) -> str:
        gold = self.gold(doc)
        return self.doc_to_choice(doc)[gold[0] if isinstance(gold, list) else gold]

    def build(self, doc: dict, index: int, fewshot: list[dict], *, chat: bool) -> MCRequest:
        text, messages = self._render(doc, fewshot, chat)
        choices = self.doc_to_choice(doc)
        delim = "" if chat else TARGET_DELIMITER
        return MCRequest(
            doc_id=self.doc_id(doc, index),
            context=text,
            continuations=[delim + c for c in choices],
            gold=self.gold(doc),
            choice_texts=list(choices),
            messages=messages,
        )

    def score(self, doc: dict, request: MCRequest, result: MCResult) -> SampleScore:
        lls = list(result.loglikelihoods)
        if len(lls) != len(request.choice_texts):
            raise InvalidArgument.for_field(
                "result.loglikelihoods", f"{len(lls)} values for {len(request.choice_texts)} choices"
            )
        values = M.mc_scores(lls, request.choice_texts, request.gold)
        values = {m: values[m] for m in self.info.metrics if m in values}
        pred = M.argmax(lls)
        golds = request.gold if isinstance(request.gold, list) else [request.gold]
        return SampleScore(
            doc_id=request.doc_id,
            metrics=values,
            prediction=request.choice_texts[pred],
            reference=" | ".join(request.choice_texts[g] for g in golds if 0 <= g < len(request.choice_texts)),
            prompt=request.context,
            extra={
                "loglikelihoods": lls,
                "is_greedy": list(result.is_greedy),
                "pred": pred,
                "pred_norm": M.argmax([ll / len(c) for ll, c in zip(lls, request.choice_texts, strict=True)]),
            },
        )


class _LetterMC(MultipleChoice):
    """MMLU / CMMLU / C-Eval: four lettered options, choices ["A", "B", "C", "D"], per-subject description,
    ``first_n`` shots from the dev split."""

    sampler = "first_n"
    repo = ""
    eval_split = "test"
    subject: str = ""

    @property
    def descriptions(self) -> dict[str, str]:
        return {}

    def __init__(self, info, options=None, *, field="benchmark", subjects: list[str] | None = None):
        super().__init__(info, options, field=field)
        self.subjects = subjects or [self.subject]

    def description(self, doc: dict) -> str:
        return self.descriptions[doc.get("_subject") or self.subjects[0]]

    def doc_to_choice(self, doc: dict) -> list[str]:
        return LETTERS4

    def doc_id(self, doc: dict, index: int) -> str:
        return f"{doc['_subject']}/{index}" if len(self.subjects) > 1 else str(index)

    def fewshot_pool(self, docs: Docs, doc: dict) -> list[dict]:
        subject = doc.get("_subject")
        return [d for d in docs.fewshot if d.get("_subject") == subject] if subject else docs.fewshot

    def _load_hub(self, data: DataSource) -> Docs:
        test: list[dict] = []
        shots: list[dict] = []
        for subject in self.subjects:
            test += [
                {**row, "_subject": subject} for row in load_split(data, Split(self.repo, subject, self.eval_split))
            ]
            if self.num_fewshot > 0:
                shots += [{**row, "_subject": subject} for row in load_split(data, Split(self.repo, subject, "dev"))]
        return Docs(test=test, fewshot=shots)


class MMLU(_LetterMC):
    # tasks/mmlu/default/_default_template_yaml:
    #   dataset_path: cais/mmlu / test_split: test / fewshot_split: dev / sampler: first_n
    #   doc_to_text: "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
    #   doc_to_choice: ["A", "B", "C", "D"] / doc_to_target: answer / metric: acc
    repo = "cais/mmlu"

    @property
    def descriptions(self):
        from services.evaluation.benchmarks.descriptions import MMLU_DESCRIPTIONS

        return MMLU_DESCRIPTIONS

    def doc_to_text(self, doc: dict) -> str:
        c = doc["choices"]
        return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"

    def gold(self, doc: dict) -> int:
        return int(doc["answer"])


class CMMLU(_LetterMC):
    # tasks/cmmlu/_default_template_yaml:
    #   dataset_path: haonan-li/cmmlu / test_split: test / fewshot_split: dev / sampler: first_n
    #   doc_to_text: "{{Question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："
    #   doc_to_target: "{{['A', 'B', 'C', 'D'].index(Answer)}}" / metrics: acc, acc_norm
    repo = "haonan-li/cmmlu"

    @property
    def descriptions(self):
        from services.evaluation.benchmarks.descriptions import CMMLU_DESCRIPTIONS

        return CMMLU_DESCRIPTIONS

    def doc_to_text(self, doc: dict) -> str:
        return f"{doc['Question'].strip()}\nA. {doc['A']}\nB. {doc['B']}\nC. {doc['C']}\nD. {doc['D']}\n答案："

    def gold(self, doc: dict) -> int:
        return LETTERS4.index(doc["Answer"])


class CEval(_LetterMC):
    # tasks/ceval/_default_ceval_yaml:
    #   dataset_path: ceval/ceval-exam / validation_split: val / fewshot_split: dev / sampler: first_n
    #   doc_to_text: "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："
    #   doc_to_target: "{{['A', 'B', 'C', 'D'].index(answer)}}" / metrics: acc, acc_norm
    repo = "ceval/ceval-exam"
    eval_split = "val"

    @property
    def descriptions(self):
        from services.evaluation.benchmarks.descriptions import CEVAL_DESCRIPTIONS

        return CEVAL_DESCRIPTIONS

    def doc_to_text(self, doc: dict) -> str:
        return f"{doc['question'].strip()}\nA. {doc['A']}\nB. {doc['B']}\nC. {doc['C']}\nD. {doc['D']}\n答案："

    def gold(self, doc: dict) -> int:
        return LETTERS4.index(doc["answer"])


class ARC(MultipleChoice):
    # tasks/arc/arc_easy.yaml (arc_challenge.yaml: dataset_name ARC-Challenge):
    #   dataset_path: allenai/ai2_arc / training_split: train / test_split: test
    #   doc_to_text: "Question: {{question}}\nAnswer:"
    #   doc_to_target: "{{choices.label.index(answerKey)}}" / doc_to_choice: "{{choices.text}}" / acc, acc_norm
    repo = "allenai/ai2_arc"

    def __init__(self, info, options=None, *, field="benchmark", config: str = "ARC-Easy"):
        super().__init__(info, options, field=field)
        self.config = config

    def doc_to_text(self, doc: dict) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_choice(self, doc: dict) -> list[str]:
        return list(doc["choices"]["text"])

    def gold(self, doc: dict) -> int:
        return list(doc["choices"]["label"]).index(doc["answerKey"])

    def _load_hub(self, data: DataSource) -> Docs:
        test = load_split(data, Split(self.repo, self.config, "test"))
        shots = load_split(data, Split(self.repo, self.config, "train")) if self.num_fewshot > 0 else []
        return Docs(test=test, fewshot=shots)


def hellaswag_preprocess(text: str) -> str:
    """tasks/hellaswag/utils.py ``preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_doc(doc: dict) -> dict:
    """tasks/hellaswag/utils.py ``process_docs`` for one row (keeps the original fields, as datasets.map does)."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        **doc,
        "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [hellaswag_preprocess(e) for e in doc["endings"]],
        "gold": int(doc["label"]),
    }


class HellaSwag(MultipleChoice):
    # tasks/hellaswag/hellaswag.yaml: dataset_path: Rowan/hellaswag / training_split: train /
    #   validation_split: validation / process_docs: utils.process_docs / doc_to_text: "{{query}}" /
    #   doc_to_target: "{{label}}" / doc_to_choice: "choices" / acc, acc_norm
    repo = "Rowan/hellaswag"

    def doc_to_text(self, doc: dict) -> str:
        return doc["query"]

    def doc_to_choice(self, doc: dict) -> list[str]:
        return list(doc["choices"])

    def gold(self, doc: dict) -> int:
        return int(doc["label"])

    def _load_hub(self, data: DataSource) -> Docs:
        test = [hellaswag_process_doc(r) for r in load_split(data, Split(self.repo, None, "validation"))]
        shots = (
            [hellaswag_process_doc(r) for r in load_split(data, Split(self.repo, None, "train"))]
            if self.num_fewshot > 0
            else []
        )
        return Docs(test=test, fewshot=shots)


TRUTHFULQA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


class TruthfulQA(MultipleChoice):
    # tasks/truthfulqa/truthfulqa_mc1.yaml: dataset_path: truthfulqa/truthful_qa / dataset_name: multiple_choice /
    #   validation_split: validation / num_fewshot: 0 /
    #   doc_to_text: "{{prompt_qa + '\n\nQ: ' + question + '\nA:'}}" (prompt_qa: the six QA pairs above) /
    #   doc_to_target: 0 / doc_to_choice: "{{mc1_targets.choices}}" / acc.
    # truthfulqa_mc2.yaml: doc_to_choice: "{{mc2_targets.choices}}", process_results: utils.process_results_mc2.
    repo = "truthfulqa/truthful_qa"
    exclude_eval_doc = True  # fewshot split and test split are both unset in the YAML

    def __init__(self, info, options=None, *, field="benchmark", variant: str = "mc1"):
        super().__init__(info, options, field=field)
        self.variant = variant

    def doc_to_text(self, doc: dict) -> str:
        return TRUTHFULQA_PROMPT + "\n\nQ: " + doc["question"] + "\nA:"

    def doc_to_choice(self, doc: dict) -> list[str]:
        return list(doc[f"{self.variant}_targets"]["choices"])

    def gold(self, doc: dict) -> int:
        return 0

    def fewshot_pool(self, docs: Docs, doc: dict) -> list[dict]:
        return docs.test

    def _load_hub(self, data: DataSource) -> Docs:
        return Docs(test=load_split(data, Split(self.repo, "multiple_choice", "validation")))

    def score(self, doc: dict, request: MCRequest, result: MCResult) -> SampleScore:
        out = super().score(doc, request, result)
        if self.variant == "mc2":
            out.metrics = {"acc": M.mc2_score(result.loglikelihoods, doc["mc2_targets"]["labels"])}
        return out


# ----------------------------------------------------------------------------- generation


class Generation(Benchmark):
    until: list[str] = []
    max_gen_toks = DEFAULT_MAX_GEN_TOKS
    metric_kwargs: dict = {}
    filters: dict[str, list[M.Filter]] = {}

    def __init__(self, info, options=None, *, field="benchmark"):
        super().__init__(info, options, field=field)
        self.max_tokens = _int_option(self.options, "max_tokens", self.max_gen_toks, field, minimum=1)

    def reference(self, doc: dict) -> str:
        return self.target_text(doc)

    def build(self, doc: dict, index: int, fewshot: list[dict], *, chat: bool) -> GenRequest:
        text, messages = self._render(doc, fewshot, chat)
        return GenRequest(
            doc_id=self.doc_id(doc, index),
            prompt=text,
            messages=messages,
            until=list(self.until),
            max_tokens=self.max_tokens,
            reference=self.reference(doc),
        )

    def filter_sets(self, doc: dict) -> dict[str, list[M.Filter]]:
        return self.filters

    def score(self, doc: dict, request: GenRequest, result: GenResult) -> SampleScore:
        texts = [M.truncate_at(t, request.until) for t in result.texts] or [""]
        gold = self.reference(doc)
        values: dict[str, float] = {}
        filtered: dict[str, str] = {}
        for name, chain in self.filter_sets(doc).items():
            answer = texts[0]  # take_first
            for f in chain:
                answer = f(answer, doc)
            filtered[name] = answer
            values[f"exact_match,{name}"] = M.exact_match(answer, gold, **self.metric_kwargs)
        primary = self.info.metrics[0].split(",", 1)[1]
        return SampleScore(
            doc_id=request.doc_id,
            metrics=values,
            prediction=filtered.get(primary, texts[0]),
            reference=gold,
            prompt=request.prompt,
            extra={"raw": texts[0], "filtered": filtered},
        )


class GSM8K(Generation):
    # tasks/gsm8k/gsm8k.yaml: dataset_path: openai/gsm8k / dataset_name: main / fewshot_split: train /
    #   test_split: test / num_fewshot: 5 / doc_to_text: "Question: {{question}}\nAnswer:" /
    #   doc_to_target: "{{answer}}" / until: ["Question:", "</s>", "<|im_end|>"] / do_sample: false /
    #   exact_match: ignore_case: true, ignore_punctuation: false, regexes_to_ignore: [",", "\\$", "(?s).*#### ", "\\.$"]
    #   strict-match: regex "#### (\\-?[0-9\\.\\,]+)" + take_first
    #   flexible-extract: regex "(-?[$0-9.,]{2,})|(-?[0-9]+)" group_select -1 + take_first
    bundled = True
    repo = "openai/gsm8k"
    until = ["Question:", "</s>", "<|im_end|>"]
    metric_kwargs = {
        "ignore_case": True,
        "ignore_punctuation": False,
        "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
    }
    filters = {
        "strict-match": [M.regex_filter(r"#### (\-?[0-9\.\,]+)")],
        "flexible-extract": [M.regex_filter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)],
    }

    def doc_to_text(self, doc: dict) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def target_text(self, doc: dict) -> str:
        return doc["answer"]

    def _load_bundled(self) -> Docs:
        test = list(_jsonl_gz(DATA_DIR / "gsm8k" / "test.jsonl.gz"))
        return Docs(test=test, fewshot=_jsonl_gz(DATA_DIR / "gsm8k" / "train.jsonl.gz") if self.num_fewshot else [])

    def _load_hub(self, data: DataSource) -> Docs:
        test = load_split(data, Split(self.repo, "main", "test"))
        shots = load_split(data, Split(self.repo, "main", "train")) if self.num_fewshot > 0 else []
        return Docs(test=test, fewshot=shots)


@cache
def _jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ----------------------------------------------------------------------------- BBH

BBH_BUNDLED = sorted(p.stem for p in (DATA_DIR / "bbh").glob("*.json"))

_YES_NO = r"\b(Yes|No|yes|no)\b"
_MC_TASKS = {
    "date_understanding",
    "disambiguation_qa",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
}
BBH_TASKS = sorted(
    _MC_TASKS
    | {
        "boolean_expressions",
        "causal_judgement",
        "dyck_languages",
        "formal_fallacies",
        "multistep_arithmetic_two",
        "navigate",
        "object_counting",
        "sports_understanding",
        "web_of_lies",
        "word_sorting",
    }
)
# Tasks whose targets come from a closed set (options "(A)".. in the input, True/False, Yes/No, valid/invalid,
# yes/no): these have a bbh_mc variant. The open-answer tasks (dyck_languages, multistep_arithmetic_two,
# object_counting, word_sorting) do not.
BBH_MC_TASKS = sorted(
    _MC_TASKS
    | {"boolean_expressions", "causal_judgement", "formal_fallacies", "navigate", "sports_understanding", "web_of_lies"}
)


def bbh_flexible_filter(task: str) -> M.Filter:
    """The ``flexible-extract`` filter of tasks/bbh/zeroshot/<task>.yaml."""
    if task in _MC_TASKS:
        return M.multi_choice_regex_filter(r"(\([A-Z]\))", ignore_case=True, ignore_punctuation=True)
    if task == "boolean_expressions":
        return M.regex_filter(r"\b(True|False)\b")
    if task in ("causal_judgement", "navigate"):
        return M.regex_filter(_YES_NO)
    if task == "formal_fallacies":
        return M.regex_filter(r"\b(valid|invalid)\b")
    if task == "dyck_languages":
        return M.regex_filter(r"(?<= )([\" \[\(<{}>\)\]]+)|([\" \[\(<{}>\)\]]+)")
    if task in ("multistep_arithmetic_two", "object_counting"):
        return M.number_parse_regex_filter(r"([-0-9]+)")
    if task == "sports_understanding":
        return M.map_regex_filter({r"\b(no|not plausible)\b": "no", r"\b(yes|plausible)\b": "yes"})
    if task == "web_of_lies":
        return M.map_regex_filter(
            {
                r"\b(no|does not tell the truth|is not telling the truth)\b": "no",
                r"\b(yes|tells the truth|is telling the truth)\b": "yes",
            }
        )
    if task == "word_sorting":
        return M.word_sort_filter
    raise KeyError(task)


@cache
def _bbh_bundled(task: str) -> tuple[dict, ...]:
    return tuple(json.loads((DATA_DIR / "bbh" / f"{task}.json").read_text(encoding="utf-8"))["examples"])


class _BBHData(Benchmark):
    repo = "SaylorTwift/bbh"  # dataset_path of tasks/bbh/zeroshot/_zeroshot_template_yaml

    def __init__(self, info, options=None, *, field="benchmark", task: str = ""):
        self.task = task
        self.bundled = task in BBH_BUNDLED
        super().__init__(info, options, field=field)

    def fewshot_pool(self, docs: Docs, doc: dict) -> list[dict]:
        return docs.fewshot or docs.test  # lm-eval: no train/validation split -> the test docs (not excluded)

    def doc_to_text(self, doc: dict) -> str:
        return f"Q: {doc['input']}\nA:"

    def target_text(self, doc: dict) -> str:
        return doc["target"]

    def _load_bundled(self) -> Docs:
        return Docs(test=[dict(d) for d in _bbh_bundled(self.task)])

    def _load_hub(self, data: DataSource) -> Docs:
        return Docs(test=load_split(data, Split(self.repo, self.task, "test")))


class BBHZeroShot(_BBHData, Generation):
    # tasks/bbh/zeroshot/_zeroshot_template_yaml + <task>.yaml: doc_to_text: "Q: {{input}}\nA:" /
    #   description per task / doc_to_target: "{{target}}" / until: ["</s>", "Q:", "<|im_end|>"] / num_fewshot: 0 /
    #   exact_match: ignore_case: true, regexes_to_ignore: ["\\.$", ",", "\n", "\\\\", '"']
    #   strict-match: take_first; flexible-extract: the task's filter (bbh_flexible_filter) + take_first
    until = ["</s>", "Q:", "<|im_end|>"]
    metric_kwargs = {"ignore_case": True, "regexes_to_ignore": ["\\.$", ",", "\n", "\\\\", '"']}

    def description(self, doc: dict) -> str:
        from services.evaluation.benchmarks.descriptions import BBH_DESCRIPTIONS

        return BBH_DESCRIPTIONS[self.task]

    def filter_sets(self, doc: dict) -> dict[str, list[M.Filter]]:
        return {"strict-match": [M.take_first], "flexible-extract": [bbh_flexible_filter(self.task)]}


class BBHMultipleChoice(_BBHData, MultipleChoice):
    """``bbh_mc:<task>`` — OURS, not an lm-eval task (lm-eval scores BBH by generation only).

    Definition (the same one the lm-eval task YAMLs under ``bench/lmeval_tasks/`` encode):
    context ``"Q: {input}\\nA:"`` (zero-shot, no description); choices = the task's closed answer set = the sorted
    distinct ``target`` values over all the task's examples (the option letters ``"(A)"``.. for option tasks,
    ``["False", "True"]``, ``["No", "Yes"]``, ``["invalid", "valid"]``, ``["no", "yes"]``); each continuation is
    target_delimiter + choice (``" (A)"``); gold = index of the doc's target; metrics acc and acc_norm as lm-eval's
    multiple_choice. The set is computed from the loaded examples (bundled copy, or the hub when asked).
    """

    def __init__(self, info, options=None, *, field="benchmark", task: str = ""):
        super().__init__(info, options, field=field, task=task)
        self._closed: list[str] | None = None

    def load(self, data: DataSource) -> Docs:
        docs = super().load(data)
        self._closed = sorted({d["target"] for d in docs.test})
        return docs

    def closed_set(self) -> list[str]:
        if self._closed is None:
            if not self.bundled:
                raise FailedPrecondition(
                    f"{self.info.name}: load() the data before building requests", reason="BENCHMARK_NOT_LOADED"
                )
            self._closed = sorted({d["target"] for d in _bbh_bundled(self.task)})
        return self._closed

    def doc_to_choice(self, doc: dict) -> list[str]:
        return self.closed_set()

    def gold(self, doc: dict) -> int:
        return self.closed_set().index(doc["target"])


# ----------------------------------------------------------------------------- HumanEval


class HumanEval(Benchmark):
    # tasks/humaneval/humaneval.yaml: dataset_path: openai/openai_humaneval / test_split: test /
    #   doc_to_text: "{{prompt}}" / doc_to_target: "{{test}}\ncheck({{entry_point}})" /
    #   until: ["\nclass", "\ndef", "\n#", "\nif", "\nprint"] / max_gen_toks: 1024 / do_sample: false /
    #   filter create_test: prompt + response / metric pass_at_k k: [1] (HF code_eval: candidate + "\n" + test_case)
    bundled = True
    repo = "openai/openai_humaneval"
    until = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    run_program: Callable | None = None  # tests may swap the sandbox call; None: services.evaluation.sandbox

    def __init__(self, info, options=None, *, field="benchmark"):
        super().__init__(info, options, field=field)
        self.n = _int_option(self.options, "n", 1, field, minimum=1)
        self.temperature = _float_option(self.options, "temperature", 0.0 if self.n == 1 else 0.8, field)
        self.max_tokens = _int_option(self.options, "max_tokens", 1024, field, minimum=1)
        self.timeout_s = _float_option(self.options, "timeout_s", 10.0, field)
        raw_k = str(self.options.get("k") or "1")
        try:
            self.ks = sorted({int(x) for x in raw_k.split(",") if x.strip()})
        except ValueError:
            raise InvalidArgument.for_field(
                f"{field}.options.k", f"must be integers like '1,10', got {raw_k!r}"
            ) from None
        if not self.ks or min(self.ks) < 1 or max(self.ks) > self.n:
            raise InvalidArgument.for_field(f"{field}.options.k", f"every k must be in 1..n={self.n}, got {raw_k!r}")

    def doc_to_text(self, doc: dict) -> str:
        return doc["prompt"]

    def target_text(self, doc: dict) -> str:
        return f"{doc['test']}\ncheck({doc['entry_point']})"

    def doc_id(self, doc: dict, index: int) -> str:
        return str(doc.get("task_id") or index)

    def program(self, doc: dict, completion: str) -> str:
        return doc["prompt"] + completion + "\n" + self.target_text(doc)

    def build(self, doc: dict, index: int, fewshot: list[dict], *, chat: bool) -> GenRequest:
        text, messages = self._render(doc, fewshot, chat)
        return GenRequest(
            doc_id=self.doc_id(doc, index),
            prompt=text,
            messages=messages,
            until=list(self.until),
            max_tokens=self.max_tokens,
            n=self.n,
            temperature=self.temperature,
            reference=doc.get("canonical_solution", ""),
        )

    def score(self, doc: dict, request: GenRequest, result: GenResult) -> SampleScore:
        run: Callable = self.run_program or _sandbox_run_program()
        completions = [M.truncate_at(t, request.until) for t in result.texts]
        statuses = []
        for completion in completions:
            outcome = run(self.program(doc, completion), timeout_s=self.timeout_s)
            statuses.append(getattr(outcome, "status", str(outcome)))
        n, c = len(completions), sum(1 for s in statuses if s == "passed")
        values = {f"pass@{k}": M.pass_at_k(n, c, k) for k in self.ks if k <= n}
        return SampleScore(
            doc_id=request.doc_id,
            metrics=values,
            prediction=completions[0] if completions else "",
            reference=request.reference,
            prompt=request.prompt,
            extra={"statuses": statuses, "passed": c, "n": n},
        )

    def _load_bundled(self) -> Docs:
        return Docs(test=list(_jsonl_gz(DATA_DIR / "humaneval" / "HumanEval.jsonl.gz")))

    def _load_hub(self, data: DataSource) -> Docs:
        return Docs(test=load_split(data, Split(self.repo, "openai_humaneval", "test")))


def _sandbox_run_program() -> Callable:
    from services.evaluation.sandbox import run_program

    return run_program
