"""Generate a sample image question set: "What colour is the shape?" over generated pictures.

    python examples/vision/colours_eval.py --out DIR [--n 40] [--seed 0] [--format multiple_choice|qa]

Writes ``DIR/colours-eval/data.jsonl`` + ``DIR/colours-eval/images/*.png`` and the archive
``DIR/colours-eval.zip`` to upload and run as a custom benchmark against a vision-language model::

    yard datasets upload DIR/colours-eval.zip --name colours-eval --version v1
    yard eval run deployments/my-vlm -b @colours-eval/v1 --watch

A ``multiple_choice`` row is ``{"question": "What colour is the shape?", "choices": ["red", "green", "blue",
"yellow"], "answer": "C", "images": ["images/0007.png"]}`` (the model answers by generation, the reply parsed to
a letter; acc); a ``qa`` row is ``{"prompt": "What colour is the shape? Answer with one word.", "reference":
"blue", "images": [...]}`` (exact match). Each picture is one coloured square, circle or triangle on grey, so
the answer is in the image alone and chance is 1/4. The same arguments give the same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cli.demo_vlm import write_shape_eval_set  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--n", type=int, default=40, help="rows (colours balanced)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("multiple_choice", "qa"), default="multiple_choice")
    args = parser.parse_args(argv)
    archive = write_shape_eval_set(args.out / "colours-eval", args.n, seed=args.seed, fmt=args.format)
    print(f"{archive} ({args.n} {args.format} rows with one image each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
