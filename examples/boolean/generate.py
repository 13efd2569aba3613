"""Generate SFT and DPO data for BBH boolean_expressions from a grammar, never from the test set.

    python examples/boolean/generate.py --out DIR [--n-sft N] [--n-dpo M] [--seed S] [--lengths 8]

Writes ``DIR/sft.jsonl`` (messages rows) and ``DIR/dpo.jsonl`` (preference rows) and prints the counts.

BBH's boolean_expressions are Python boolean expressions over ``True``/``False`` with ``not``, ``and``,
``or`` and parentheses, exactly 8 tokens long (tokens separated by single spaces), followed by `` is``.
This script enumerates EVERY expression of the wanted token lengths with the grammar below (an
unambiguous one, so each expression is produced once), evaluates it with Python's own precedence
(``not`` > ``and`` > ``or``), drops every expression that appears verbatim in the bundled BBH test
file, and samples the rest with a seeded RNG::

    expr := and_expr ( "or" and_expr )*
    and_expr := not_expr ( "and" not_expr )*
    not_expr := "not" not_expr | atom
    atom := "True" | "False" | "(" expr ")"

There are 2,122 expressions of 8 tokens; the 250 test ones are removed, leaving 1,872. Drawing
uniformly from them reproduces the test set's shape (operands per expression, parentheses, ``not``
chains), since the test set is itself a sample of the same space.

The prompt is the benchmark's own template ("Q: {expression} is\\nA:") as a user turn; the answer is
" True" or " False" as the assistant turn (with the benchmark's target delimiter, see ANSWER_PREFIX). A DPO pair has the correct answer as ``chosen`` and the other
as ``rejected``: the benchmark compares exactly these two continuations' log-likelihoods, so the
preference loss trains the very margin the metric reads.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BBH_FILE = ROOT / "services" / "evaluation" / "data" / "bbh" / "boolean_expressions.json"
# The answers are written " True" / " False" (with lm-eval's target delimiter): the configuration `make demo` measured
# end to end (0.536 -> 0.680). Note: in chat mode the evaluation scores the continuation WITHOUT the delimiter
# ("True" right after "<|im_start|>assistant\n"), and an A/B through the stack (yard train / yard eval, not the demo
# pipeline) measured "True" at 0.740 acc with the chosen choice's log-prob near -0.5, while " True" leaves that
# log-prob near -14 (acc_norm 0.52): the answer's probability sits on a token the benchmark does not read. Training
# on "True" (ANSWER_PREFIX = "") is the better target; it is not yet measured through `make demo`.
ANSWER_PREFIX = " "


@cache
def _atom(n: int) -> tuple[str, ...]:
    out = ["B"] if n == 1 else []
    if n >= 3:
        out += [f"( {e} )" for e in _expr(n - 2)]
    return tuple(out)


@cache
def _not(n: int) -> tuple[str, ...]:
    out = list(_atom(n))
    if n >= 2:
        out += [f"not {e}" for e in _not(n - 1)]
    return tuple(out)


@cache
def _and(n: int) -> tuple[str, ...]:
    out = list(_not(n))
    for k in range(1, n - 1):
        out += [f"{a} and {b}" for a in _and(k) for b in _not(n - k - 1)]
    return tuple(out)


@cache
def _expr(n: int) -> tuple[str, ...]:
    """Every expression shape of exactly ``n`` tokens, ``B`` standing for an operand."""
    out = list(_and(n))
    for k in range(1, n - 1):
        out += [f"{a} or {b}" for a in _expr(k) for b in _and(n - k - 1)]
    return tuple(out)


def expressions(length: int) -> list[str]:
    """Every expression of ``length`` tokens, operands filled in every way (sorted: deterministic)."""
    out = []
    for shape in _expr(length):
        tokens = shape.split()
        slots = [i for i, t in enumerate(tokens) if t == "B"]
        for bits in range(2 ** len(slots)):
            for j, i in enumerate(slots):
                tokens[i] = "True" if bits >> j & 1 else "False"
            out.append(" ".join(tokens))
    return sorted(out)


def evaluate(expression: str) -> bool:
    """The value of an expression of the grammar (only its tokens can occur: checked)."""
    if not set(expression.split()) <= {"True", "False", "not", "and", "or", "(", ")"}:
        raise ValueError(f"not a boolean expression: {expression!r}")
    return bool(eval(expression, {"__builtins__": {}}))  # noqa: S307 - the grammar's tokens only


def test_expressions(path: Path = BBH_FILE) -> set[str]:
    """The test set's expressions (its inputs without the trailing ``is``)."""
    examples = json.loads(path.read_text())["examples"]
    return {e["input"].removesuffix(" is").strip() for e in examples}


def prompt(expression: str) -> str:
    return f"Q: {expression} is\nA:"


def _draw(pool: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` expressions: whole shuffled passes over the pool, so none repeats before all were used."""
    out: list[str] = []
    while len(out) < n:
        batch = pool[:]
        rng.shuffle(batch)
        out += batch[: n - len(out)]
    return out


def generate(n_sft: int, n_dpo: int, n_dev: int, seed: int, lengths: list[int]) -> tuple[list, list, list, dict]:
    """SFT rows, DPO pairs and a dev set, drawn from every expression of ``lengths`` tokens minus the test set.

    The dev expressions (BBH's own shape, for choosing hyperparameters without touching the test set) are
    set aside first and never trained on. SFT rows come next, then DPO pairs from the expressions SFT has not
    used (cycling only once all were used). DPO pairs are balanced between "True" and "False" chosen.
    """
    test = test_expressions()
    space = [e for n in lengths for e in expressions(n)]
    pool = [e for e in space if e not in test]
    rng = random.Random(seed)
    rng.shuffle(pool)
    if n_dev >= len(pool):
        raise SystemExit(f"--n-dev {n_dev} leaves no training expression (pool: {len(pool)})")
    dev, train = pool[:n_dev], pool[n_dev:]
    order = _draw(train, n_sft + len(train), rng)  # SFT first, then the rest of a pass, then new passes
    sft = [_sft_row(e) for e in order[:n_sft]]
    rest = order[n_sft:]
    by_value = {v: [e for e in rest if evaluate(e) is v] for v in (True, False)}
    if n_dpo and not all(by_value.values()):
        raise SystemExit("DPO pairs need expressions of both values; use more --lengths")
    dpo = []
    for i in range(n_dpo):
        value = i % 2 == 0
        e = by_value[value][(i // 2) % len(by_value[value])]
        dpo.append({"prompt": prompt(e), "chosen": ANSWER_PREFIX + str(value), "rejected": ANSWER_PREFIX + str(not value)})
    dev_rows = [{"input": f"{e} is", "target": str(evaluate(e))} for e in dev]
    stats = {"space": len(space), "test_removed": len(space) - len(pool), "pool": len(pool), "train": len(train)}
    return sft, dpo, dev_rows, stats


def _sft_row(expression: str) -> dict:
    answer = ANSWER_PREFIX + str(evaluate(expression))
    return {"messages": [{"role": "user", "content": prompt(expression)}, {"role": "assistant", "content": answer}]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument("--n-sft", type=int, default=320, help="SFT rows (default 320)")
    parser.add_argument("--n-dpo", type=int, default=160, help="DPO pairs (default 160)")
    parser.add_argument("--n-dev", type=int, default=250, help="dev expressions set aside, never trained on (default 250)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    parser.add_argument("--lengths", default="8", help="comma-separated token lengths (default 8, as BBH)")
    args = parser.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--lengths: expected comma-separated integers, got {args.lengths!r}")
    if not lengths or any(n < 1 for n in lengths):
        parser.error(f"--lengths: token lengths must be positive, got {args.lengths!r}")
    for name in ("n_sft", "n_dpo", "n_dev"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    sft, dpo, dev, stats = generate(args.n_sft, args.n_dpo, args.n_dev, args.seed, lengths)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("sft.jsonl", sft), ("dpo.jsonl", dpo), ("dev.jsonl", dev)):
        with open(args.out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"expressions of {args.lengths} tokens: {stats['space']}; in the BBH test set (removed): "
          f"{stats['test_removed']}; dev (set aside): {len(dev)}; left for training: {stats['train']}")
    print(f"wrote {args.out}/sft.jsonl ({len(sft)} rows), {args.out}/dpo.jsonl ({len(dpo)} pairs), "
          f"{args.out}/dev.jsonl ({len(dev)} expressions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
