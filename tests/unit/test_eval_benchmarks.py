"""The benchmark library: prompt formats pinned to lm-evaluation-harness 0.4.13's task YAMLs, filters, metrics,
aggregation and custom-set validation.

lm_eval is not installed here, so each expected prompt is derived from the task YAML: its ``doc_to_text`` jinja
(quoted in a comment) is rendered with jinja2 where it is jinja, and the assembly (description + shots joined with
target_delimiter " " and fewshot_delimiter "\\n\\n") is written out by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import jinja2
import pytest

from services.core.errors import FailedPrecondition, InvalidArgument
from services.evaluation.benchmarks import (
    DataSource,
    Docs,
    GenRequest,
    GenResult,
    MCRequest,
    MCResult,
    SampleScore,
    aggregate,
    custom_benchmark,
    list_benchmarks,
    resolve,
)
from services.evaluation.benchmarks import metrics as M
from services.evaluation.benchmarks import tasks as T

JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined)


def jinja(template: str, doc: dict) -> str:
    return JINJA.from_string(template).render(**doc)


@pytest.fixture
def data(tmp_path) -> DataSource:
    return DataSource(cache_dir=tmp_path / "cache", offline=True)


# ----------------------------------------------------------------------------- catalogue


def test_catalogue_lists_every_runnable_family_once():
    names = [b.name for b in list_benchmarks()]
    assert len(names) == len(set(names))
    for expected in (
        "gsm8k",
        "mmlu",
        "mmlu:abstract_algebra",
        "cmmlu:agronomy",
        "ceval:accountant",
        "arc_easy",
        "arc_challenge",
        "hellaswag",
        "truthfulqa_mc1",
        "truthfulqa_mc2",
        "humaneval",
        "bbh:navigate",
        "bbh:date_understanding",
        "bbh_mc:snarks",
        "bbh_mc:boolean_expressions",
    ):
        assert expected in names
    assert sum(n.startswith("bbh:") for n in names) == 27 and sum(n.startswith("mmlu:") for n in names) == 57
    assert "bbh_mc:word_sorting" not in names and "bbh_mc:object_counting" not in names
    info = {b.name: b for b in list_benchmarks()}
    assert info["bbh:navigate"].source == "bundled" and info["bbh:navigate"].num_samples == 250
    assert info["bbh:date_understanding"].source == "hub"  # not in the vendored copy
    assert info["gsm8k"].default_num_fewshot == 5 and info["gsm8k"].metrics[0] == "exact_match,strict-match"


def test_resolve_rejects_unknown_names_with_suggestions_and_unknown_options_by_key():
    with pytest.raises(InvalidArgument) as err:
        resolve("gsm8kk", field="spec.benchmarks[0].name")
    assert err.value.violations[0].field == "spec.benchmarks[0].name" and "gsm8k" in err.value.message
    with pytest.raises(InvalidArgument) as err:
        resolve("gsm8k", {"shots": "3"})
    assert err.value.violations[0].field == "benchmark.options.shots"
    with pytest.raises(InvalidArgument) as err:
        resolve("gsm8k", {"num_fewshot": "many"})
    assert "num_fewshot" in err.value.violations[0].field
    with pytest.raises(InvalidArgument):
        resolve("mmlu", {"subjects": "anatomy,astrology"})
    with pytest.raises(InvalidArgument):
        resolve("humaneval", {"n": "2", "k": "5"})


def test_hub_only_benchmark_offline_without_cache_fails_cleanly(data):
    with pytest.raises(FailedPrecondition) as err:
        resolve("arc_easy").load(data)
    assert "allenai/ai2_arc" in err.value.message
    with pytest.raises(FailedPrecondition):
        resolve("arc_easy").load(DataSource(cache_dir=data.cache_dir, hub="bundled"))


# ----------------------------------------------------------------------------- formats


def test_mmlu_prompt_matches_the_yaml():
    # _default_template_yaml: doc_to_text: "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
    # mmlu_abstract_algebra.yaml: description: "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    tmpl = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
    doc = {
        "question": "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field. ",
        "choices": ["0", "1", "2", "3"],
        "answer": 1,
        "subject": "abstract_algebra",
    }
    shot = {
        "question": "Find the degree for the given field extension Q(sqrt(2)) over Q.",
        "choices": ["0", "2", "1", "3"],
        "answer": 1,
        "subject": "abstract_algebra",
    }
    bench = resolve("mmlu:abstract_algebra", {"num_fewshot": "1"})
    req = bench.build(doc, 0, [shot], chat=False)
    desc = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    assert req.context == desc + jinja(tmpl, shot) + " B" + "\n\n" + jinja(tmpl, doc)
    assert req.context.endswith("is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:")
    assert req.continuations == [" A", " B", " C", " D"] and req.gold == 1 and bench.info.metrics == ["acc"]
    chat = bench.build(doc, 0, [shot], chat=True)
    assert chat.messages == [{"role": "system", "content": desc}, {"role": "user", "content": req.context[len(desc) :]}]
    assert chat.continuations == ["A", "B", "C", "D"]  # lm-eval drops the target delimiter under a chat template


def test_mmlu_first_n_shots_come_from_the_subjects_dev_split():
    bench = resolve("mmlu", {"subjects": "anatomy,astronomy", "num_fewshot": "2"})
    dev = [{"question": f"q{i}", "_subject": s} for s in ("anatomy", "astronomy") for i in range(3)]
    doc = {"question": "x", "_subject": "astronomy"}
    assert [d["question"] for d in bench.fewshot_examples(Docs(test=[doc], fewshot=dev), doc, 2)] == ["q0", "q1"]
    assert all(d["_subject"] == "astronomy" for d in bench.fewshot_examples(Docs([doc], dev), doc, 2))


def test_cmmlu_and_ceval_prompts_match_the_yaml():
    # cmmlu/_default_template_yaml: doc_to_text: "{{Question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："
    # doc_to_target: "{{['A', 'B', 'C', 'D'].index(Answer)}}"
    tmpl = "{{Question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："
    doc = {
        "Question": "在农业生产中被当作极其重要的劳动对象发挥作用，最主要的不可替代的基本生产资料是",
        "A": "农业生产工具",
        "B": "土地",
        "C": "劳动力",
        "D": "资金",
        "Answer": "B",
    }
    req = resolve("cmmlu:agronomy").build(doc, 0, [], chat=False)
    assert req.context == "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n" + jinja(tmpl, doc)
    assert req.gold == 1 and req.continuations == [" A", " B", " C", " D"]
    # ceval/_default_ceval_yaml: doc_to_text: "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："
    ctmpl = "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："
    cdoc = {
        "id": 0,
        "question": "下列关于税法基本原则的表述中，不正确的是____。",
        "A": "税收法定原则包括税收要件法定原则和税务合法性原则",
        "B": "税收公平原则源于法律上的平等性原则",
        "C": "税收效率原则包含经济效率和行政效率两个方面",
        "D": "税务机关按法定程序依法征税，可以自由做出减征、停征或免征税款的决定",
        "answer": "D",
        "explanation": "",
    }
    creq = resolve("ceval:accountant").build(cdoc, 0, [], chat=False)
    assert creq.context == "以下是中国关于注册会计师的单项选择题，请选出其中的正确答案。\n\n" + jinja(ctmpl, cdoc)
    assert creq.gold == 3 and resolve("ceval:accountant").info.metrics == ["acc", "acc_norm"]


def test_arc_prompt_choices_and_gold_match_the_yaml():
    # arc_easy.yaml: doc_to_text: "Question: {{question}}\nAnswer:"
    # doc_to_target: "{{choices.label.index(answerKey)}}" / doc_to_choice: "{{choices.text}}"
    doc = {
        "id": "Mercury_7175875",
        "question": "An astronomer observes that a planet rotates faster after a meteorite "
        "impact. Which is the most likely effect of this increase in rotation?",
        "choices": {
            "text": [
                "Planetary density will decrease.",
                "Planetary years will become longer.",
                "Planetary days will become shorter.",
                "Planetary gravity will become stronger.",
            ],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "C",
    }
    shot = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["1", "2"]}, "answerKey": "2"}
    req = resolve("arc_challenge", {"num_fewshot": "1"}).build(doc, 0, [shot], chat=False)
    assert req.context == "Question: Which is a gas?\nAnswer: steam\n\n" + jinja("Question: {{question}}\nAnswer:", doc)
    assert req.continuations[2] == " Planetary days will become shorter." and req.gold == 2
    assert req.choice_texts == doc["choices"]["text"]


def test_hellaswag_preprocessing_matches_lm_eval_utils():
    # hellaswag.yaml: process_docs: !function utils.process_docs / doc_to_text: "{{query}}" / doc_to_target: "{{label}}"
    row = {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering "
        "the window of a car, and a woman wearing winter clothes smiles.",
        "ctx_b": "then",
        "ctx": "",
        "endings": [
            ", the man adds wax to the windshield and cuts it.",
            ", a person board a ski lift, "
            "while two men supporting the head of the person wearing winter clothes snow as "
            "the we girls sled.",
            ", the man puts on a christmas coat, knitted with netting.",
            ", the man continues removing the snow on his car.",
        ],
        "source_id": "activitynet~v_-1IBHYS3L-Y",
        "split": "train",
        "split_type": "indomain",
        "label": "3",
    }
    doc = T.hellaswag_process_doc(row)
    assert doc["query"] == (
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, "
        "and a woman wearing winter clothes smiles. Then"
    )
    wikihow = T.hellaswag_preprocess("How to x [title] Do it.  [step] Now [header] go")
    # one pass of replace("  ", " ") leaves two of the three spaces that surrounded "[step]", as lm-eval does
    assert wikihow == "How to x. Do it.  Now go"
    req = resolve("hellaswag").build(doc, 0, [], chat=False)
    assert req.context == doc["query"] and req.gold == 3
    assert req.continuations[3] == " , the man continues removing the snow on his car."


def test_truthfulqa_mc1_prompt_and_mc2_metric():
    # truthfulqa_mc1.yaml: doc_to_text: "{{prompt_qa + '\n\nQ: ' + question + '\nA:'}}" / doc_to_target: 0
    doc = {
        "question": "What is the smallest country in the world that is at least one square mile in area?",
        "mc1_targets": {
            "choices": ["Nauru is the smallest country.", "The smallest country is Vatican City."],
            "labels": [1, 0],
        },
        "mc2_targets": {"choices": ["Nauru", "Vatican City", "Monaco"], "labels": [1, 0, 0]},
    }
    req = resolve("truthfulqa_mc1").build(doc, 0, [], chat=False)
    assert req.context.startswith("Q: What is human life expectancy in the United States?\nA: Human life expectancy")
    assert req.context.endswith("A: The 1992 Olympics were held in Barcelona, Spain.\n\nQ: " + doc["question"] + "\nA:")
    assert req.gold == 0 and req.continuations == [
        " Nauru is the smallest country.",
        " The smallest country is Vatican City.",
    ]
    mc2 = resolve("truthfulqa_mc2")
    r2 = mc2.build(doc, 0, [], chat=False)
    lls = [math.log(0.2), math.log(0.6), math.log(0.2)]
    out = mc2.score(doc, r2, MCResult(lls, [False, True, False]))
    assert out.metrics == {"acc": pytest.approx(0.2)}


def test_gsm8k_bundled_five_shot_prompt(data):
    # gsm8k.yaml: doc_to_text: "Question: {{question}}\nAnswer:" / doc_to_target: "{{answer}}" / fewshot_split: train
    bench = resolve("gsm8k")
    docs = bench.load(data)
    assert len(docs.test) == 1319 and len(docs.fewshot) == 7473
    doc = docs.test[0]
    shots = bench.fewshot_examples(docs, doc, 5)
    req = bench.build(doc, 0, shots, chat=False)
    expected = "".join(jinja("Question: {{question}}\nAnswer:", s) + " " + s["answer"] + "\n\n" for s in shots)
    assert req.prompt == expected + "Question: " + doc["question"] + "\nAnswer:"
    assert req.until == ["Question:", "</s>", "<|im_end|>"] and req.max_tokens == 256
    # lm-eval's default sampler: one Random(1234) drawing sample(train, 5) per eval doc in order
    import random

    rnd = random.Random(1234)
    first, second = rnd.sample(docs.fewshot, 5), rnd.sample(docs.fewshot, 5)
    assert shots == first and bench.fewshot_examples(docs, docs.test[1], 5) == second
    assert bench.fewshot_examples(docs, doc, 5) == first  # stable when asked again


def test_bbh_zeroshot_prompt_and_bbh_mc_definition(data):
    # bbh/zeroshot/navigate.yaml: description: "Given a series of navigation instructions, determine whether one
    # would end up back at the starting point.\n\n" / doc_to_text: "Q: {{input}}\nA:"
    gen = resolve("bbh:navigate")
    docs = gen.load(data)
    doc = docs.test[0]
    req = gen.build(doc, 0, [], chat=False)
    assert req.prompt == (
        "Given a series of navigation instructions, determine whether one would end up back at "
        "the starting point.\n\n" + jinja("Q: {{input}}\nA:", doc)
    )
    assert req.until == ["</s>", "Q:", "<|im_end|>"] and req.reference == doc["target"]
    mc = resolve("bbh_mc:navigate")
    mdocs = mc.load(data)
    mreq = mc.build(mdocs.test[0], 0, [], chat=False)
    assert mreq.context == "Q: " + mdocs.test[0]["input"] + "\nA:"
    assert mreq.continuations == [" No", " Yes"] and mreq.choice_texts[mreq.gold] == mdocs.test[0]["target"]
    snarks = resolve("bbh_mc:snarks")
    snarks.load(data)
    assert snarks.closed_set() == ["(A)", "(B)"]
    assert resolve("bbh_mc:boolean_expressions").closed_set() == ["False", "True"]
    assert resolve("bbh_mc:formal_fallacies").closed_set() == ["invalid", "valid"]


def test_humaneval_prompt_program_and_pass_at_k(data):
    # humaneval.yaml: doc_to_text: "{{prompt}}" / doc_to_target: "{{test}}\ncheck({{entry_point}})"
    # until: ["\nclass", "\ndef", "\n#", "\nif", "\nprint"] / max_gen_toks: 1024
    bench = resolve("humaneval", {"n": "3", "k": "1,2"})
    docs = bench.load(data)
    doc = docs.test[2]
    req = bench.build(doc, 2, [], chat=False)
    assert req.prompt == doc["prompt"] and req.n == 3 and req.max_tokens == 1024 and req.temperature == 0.8
    assert req.until == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"] and req.doc_id == "HumanEval/2"
    seen = []

    class Outcome:
        def __init__(self, status):
            self.status = status

    def stand_in(program, timeout_s):  # stand-in for services.evaluation.sandbox.run_program only
        seen.append(program)
        ns: dict = {}
        try:
            exec(compile(program, "<humaneval>", "exec"), ns)  # noqa: S102 - trusted canonical solution
        except AssertionError:
            return Outcome("failed")
        return Outcome("passed")

    bench.run_program = stand_in
    good, bad = doc["canonical_solution"], "    return -1.0\n"
    out = bench.score(doc, req, GenResult([good + "\ndef extra():\n    pass", bad, good]))
    assert seen[0] == doc["prompt"] + good + "\n" + doc["test"] + "\ncheck(" + doc["entry_point"] + ")"
    assert out.extra["statuses"] == ["passed", "failed", "passed"]
    assert out.metrics == {"pass@1": pytest.approx(2 / 3), "pass@2": pytest.approx(1.0)}
    assert M.pass_at_k(5, 0, 1) == 0.0 and M.pass_at_k(10, 3, 1) == pytest.approx(0.3)


# ----------------------------------------------------------------------------- filters and metrics


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", "72"),
        ("So the answer is $1,234.", "[invalid]", "$1,234."),
        ("The total is 5 then 18 dollars", "[invalid]", "18"),
        ("#### -3.5 and later 7", "-3.5", "7"),
        ("no numbers here", "[invalid]", "[invalid]"),
    ],
)
def test_gsm8k_strict_and_flexible_extraction(text, strict, flexible):
    assert M.regex_filter(r"#### (\-?[0-9\.\,]+)")(text, {}) == strict
    assert M.regex_filter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)(text, {}) == flexible


def test_gsm8k_exact_match_uses_the_yaml_ignores():
    bench = resolve("gsm8k", {"num_fewshot": "0"})
    doc = {"question": "q", "answer": "Step one.\nStep two.\n#### 1,234"}
    req = bench.build(doc, 0, [], chat=False)
    s = bench.score(doc, req, GenResult([" The answer is $1234.\n#### 1234\n\nQuestion: next one"]))
    assert s.metrics == {"exact_match,strict-match": 1.0, "exact_match,flexible-extract": 1.0}
    assert s.extra["filtered"] == {"strict-match": "1234", "flexible-extract": "1234"}
    miss = bench.score(doc, req, GenResult(["It is 1234 and then 12 more"]))
    assert miss.metrics == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 0.0}


@pytest.mark.parametrize(
    ("task", "doc", "text", "filtered"),
    [
        ("boolean_expressions", {"input": "not True"}, " The result is False.", "False"),
        ("navigate", {"input": "x"}, " yes, you do", "yes"),
        ("formal_fallacies", {"input": "x"}, " The argument is invalid", "invalid"),
        ("snarks", {"input": "Which?\nOptions:\n(A) He is kind\n(B) He is cruel"}, " The answer is (B).", "(B)"),
        ("snarks", {"input": "Which?\nOptions:\n(A) He is kind\n(B) He is cruel"}, " he is cruel!", "(B)"),
        ("snarks", {"input": "Which?\nOptions:\n(A) He is kind\n(B) He is cruel"}, " Answer: A", "(A)"),
        ("snarks", {"input": "Which?\nOptions:\n(A) He is kind\n(B) He is cruel"}, " no idea", "[invalid]"),
        ("sports_understanding", {"input": "x"}, " This is not plausible.", "no"),
        ("sports_understanding", {"input": "x"}, " Plausible", "yes"),
        ("web_of_lies", {"input": "x"}, " Jim tells the truth.", "yes"),
        ("object_counting", {"input": "x"}, " I count twenty one items", "21"),
        ("object_counting", {"input": "x"}, " twenty-one", "-"),  # lm-eval's "([-0-9]+)" takes the hyphen first
        ("multistep_arithmetic_two", {"input": "x"}, " = -42", "-42"),
        ("word_sorting", {"input": "Sort alphabetically: List: pear apple fig"}, " apple fig pear", "apple fig pear"),
        ("dyck_languages", {"input": "x"}, " ) ]", ") ]"),
    ],
)
def test_bbh_flexible_extract_filters(task, doc, text, filtered):
    assert T.bbh_flexible_filter(task)(text, doc) == filtered


def test_bbh_exact_match_strict_and_flexible():
    bench = resolve("bbh:boolean_expressions")
    doc = {"input": "not ( True ) and ( True ) is", "target": "False"}
    req = bench.build(doc, 0, [], chat=False)
    s = bench.score(doc, req, GenResult(["False.\nQ: next"]))
    assert s.metrics == {"exact_match,strict-match": 1.0, "exact_match,flexible-extract": 1.0}
    loose = bench.score(doc, req, GenResult([" It is false, I think: False"]))
    assert loose.metrics == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 1.0}


def test_acc_and_acc_norm_on_hand_made_loglikelihoods():
    bench = resolve("arc_easy")
    doc = {"question": "q", "choices": {"text": ["a", "a much longer answer"], "label": ["A", "B"]}, "answerKey": "B"}
    req = bench.build(doc, 0, [], chat=False)
    # raw: choice 0 wins (-2 > -8); per character: -2/1 = -2 < -8/20 = -0.4, so choice 1 wins
    s = bench.score(doc, req, MCResult([-2.0, -8.0], [True, False]))
    assert s.metrics == {"acc": 0.0, "acc_norm": 1.0} and s.prediction == "a"
    assert M.argmax([1.0, 3.0, 3.0]) == 1  # first maximum, as numpy
    with pytest.raises(InvalidArgument):
        bench.score(doc, req, MCResult([-1.0], [True]))


def test_aggregate_mean_and_stderr_match_a_hand_computation():
    info = resolve("arc_easy").info
    values = [1.0, 0.0, 1.0, 1.0]
    scores = [SampleScore(str(i), {"acc": v, "acc_norm": 1.0 - v}, "", "", "") for i, v in enumerate(values)]
    out = aggregate(info, scores)
    mean = 0.75
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)  # sample stdev (n - 1)
    assert out["acc"] == (pytest.approx(mean), pytest.approx(sd / 2))
    assert out["acc_norm"][0] == pytest.approx(0.25)
    assert aggregate(info, []) == {}
    assert aggregate(info, scores[:1])["acc"] == (1.0, 0.0)


# ----------------------------------------------------------------------------- custom sets


def test_custom_multiple_choice_set_accepts_index_text_and_letter_answers():
    rows = [
        (1, {"question": "2+2?", "choices": ["3", "4"], "answer": 1}),
        (2, {"question": "Sky?", "choices": ["blue", "green"], "answer": "blue", "id": "sky"}),
        (3, {"question": "Third?", "choices": ["x", "y", "z"], "answer": "c"}),
    ]
    bench, issues = custom_benchmark(rows, name="my-set", field="spec.custom")
    assert issues == [] and bench.info.kind == "multiple_choice" and bench.info.num_samples == 3
    docs = bench.load(DataSource(cache_dir=Path("/nonexistent")))
    assert [d["answer"] for d in docs.test] == [1, 0, 2] and docs.test[1]["id"] == "sky"
    req = bench.build(docs.test[0], 0, [], chat=False)
    assert isinstance(req, MCRequest) and req.context == "2+2?\nA. 3\nB. 4\nAnswer:" and req.gold == 1
    assert bench.score(docs.test[0], req, MCResult([-3.0, -1.0], [False, True])).metrics == {"acc": 1.0}


def test_custom_generation_set_scores_exact_match():
    bench, _ = custom_benchmark(
        [(1, {"prompt": "Capital of France?", "reference": "Paris"})], name="qa", field="spec.custom"
    )
    doc = bench.load(DataSource(cache_dir=Path("/x"))).test[0]
    req = bench.build(doc, 0, [], chat=True)
    assert isinstance(req, GenRequest) and req.messages == [{"role": "user", "content": "Capital of France?"}]
    assert bench.score(doc, req, GenResult([" paris \n"])).metrics == {"exact_match": 1.0}
    assert bench.score(doc, req, GenResult(["Lyon"])).metrics == {"exact_match": 0.0}


def test_custom_set_reports_every_bad_row_with_number_field_and_reason():
    rows = [
        (1, {"question": "ok?", "choices": ["a", "b"], "answer": 0}),
        (2, {"question": "", "choices": ["a", "b"], "answer": 0}),
        (3, {"question": "q", "choices": ["a"], "answer": 0}),
        (4, {"question": "q", "choices": ["a", "b"], "answer": 5}),
        (5, {"prompt": "p", "reference": "r"}),
        (6, {"question": "q", "choices": ["a", "b"], "answer": "Q"}),
        (7, {"foo": 1}),
        (8, ["not", "a", "dict"]),
    ]
    with pytest.raises(InvalidArgument) as err:
        custom_benchmark(rows, name="bad", field="spec.custom")
    fields = [(v.field, v.description) for v in err.value.violations]
    assert [f for f, _ in fields] == [
        "spec.custom[row 2].question",
        "spec.custom[row 3].choices",
        "spec.custom[row 4].answer",
        "spec.custom[row 5].row",
        "spec.custom[row 6].answer",
        "spec.custom[row 7].row",
        "spec.custom[row 8].row",
    ]
    assert "row 5: row: is a generation row in a multiple choice set (row 1 set the kind)" in err.value.message
    assert "index 5 out of range 0..1" in err.value.message
    many = [(i, {"prompt": "", "reference": "r"}) for i in range(1, 31)]
    with pytest.raises(InvalidArgument) as err:
        custom_benchmark(many, name="many", field="f")
    assert len(err.value.violations) == 20 and "30 bad row(s) (and 10 more)" in err.value.message
    with pytest.raises(InvalidArgument):
        custom_benchmark([], name="empty", field="f")
    with pytest.raises(InvalidArgument) as err:
        custom_benchmark(
            [(1, {"prompt": "a", "reference": "b", "id": 1}), (2, {"prompt": "c", "reference": "d", "id": "1"})],
            name="d",
            field="f",
        )
    assert "repeats the id of row 1" in err.value.message
