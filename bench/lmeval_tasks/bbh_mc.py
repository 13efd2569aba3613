"""BBH as lm-eval multiple-choice tasks, ``bbh_mc_<task>``, the same definition ModelYard's evaluation uses.

One task per BBH subtask whose closed answer set (the sorted distinct ``target`` values over all its
examples) has at most ``MAX_CHOICES`` entries. Each example is scored by log-likelihood:

- context ``"Q: {input}\\nA:"``, target delimiter ``" "``, choices = the closed set, gold = index of ``target``;
- metrics ``acc`` and ``acc_norm`` (mean), zero-shot, test split = every example of the JSON file.

The YAMLs are generated at run time into a folder with absolute paths to the JSON files (the vendored
``services/evaluation/data/bbh`` by default), with ``utils.py`` (the ``process_docs`` hook) copied beside
them; pass that folder to lm-eval's ``TaskManager(include_path=...)`` or ``--include_path``.

    python bench/lmeval_tasks/bbh_mc.py --list                 # the qualifying tasks and their set sizes
    python bench/lmeval_tasks/bbh_mc.py --write /tmp/bbh_tasks # write every qualifying task

Standard library only, so any virtualenv can import it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

TASK_PREFIX = "bbh_mc_"
MAX_CHOICES = 20
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT / "services" / "evaluation" / "data" / "bbh"
HERE = Path(__file__).resolve().parent


def _load_utils():
    # utils.py is both lm-eval's hook module (loaded by path from the generated folder) and the one
    # definition of the closed set; loaded by path here too, so this file imports from any venv or cwd.
    spec = importlib.util.spec_from_file_location("bbh_mc_utils", HERE / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


closed_set = _load_utils().closed_set


def load_examples(path: Path) -> list[dict]:
    """The ``examples`` of one BBH JSON file; every one must carry string ``input`` and ``target``."""
    try:
        examples = json.loads(path.read_text())["examples"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a BBH task file with an 'examples' list ({exc})") from exc
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("target"), str):
            raise ValueError(f"{path}: examples[{i}] needs string 'input' and 'target'")
    return examples


def task_sets(data_dir: Path = DEFAULT_DATA_DIR) -> dict[str, list[str]]:
    """Every BBH subtask in ``data_dir`` mapped to its closed answer set (qualifying or not)."""
    files = sorted(Path(data_dir).glob("*.json"))
    if not files:
        raise ValueError(f"data_dir: no BBH *.json files in {data_dir}")
    return {f.stem: closed_set(ex["target"] for ex in load_examples(f)) for f in files}


def qualifying_tasks(data_dir: Path = DEFAULT_DATA_DIR) -> list[str]:
    """The lm-eval task names (``bbh_mc_<subtask>``) whose closed set has at most ``MAX_CHOICES`` answers."""
    return [TASK_PREFIX + name for name, choices in task_sets(data_dir).items() if len(choices) <= MAX_CHOICES]


def task_yaml(name: str, data_file: Path) -> str:
    """The lm-eval YAML of one ``bbh_mc_<name>`` task reading ``data_file`` (absolute path)."""
    config = {
        "task": TASK_PREFIX + name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}, "field": "examples"},
        "test_split": "test",
        "output_type": "multiple_choice",
        "process_docs": "!function utils.process_docs",
        "doc_to_text": "Q: {{input}}\nA:",
        "target_delimiter": " ",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "num_fewshot": 0,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    # JSON is YAML; the one tag (!function) must stay unquoted.
    lines = [f"{key}: {json.dumps(value)}" for key, value in config.items()]
    return "\n".join(lines).replace('"!function utils.process_docs"', "!function utils.process_docs") + "\n"


def write_task_dir(out_dir: Path, tasks: list[str] | None = None, data_dir: Path = DEFAULT_DATA_DIR) -> list[str]:
    """Writes one YAML per requested task (default: every qualifying one) plus ``utils.py`` into ``out_dir``.

    ``tasks`` are lm-eval names (``bbh_mc_<subtask>``). Returns the names written; raises ``ValueError``
    naming the task for an unknown one or one whose answer set is larger than ``MAX_CHOICES``.
    """
    sets = task_sets(data_dir)
    names = tasks if tasks is not None else qualifying_tasks(data_dir)
    for task in names:
        sub = task.removeprefix(TASK_PREFIX)
        if not task.startswith(TASK_PREFIX) or sub not in sets:
            raise ValueError(f"tasks: unknown task {task!r}; known: {', '.join(qualifying_tasks(data_dir))}")
        if len(sets[sub]) > MAX_CHOICES:
            raise ValueError(f"tasks: {task!r} has {len(sets[sub])} distinct targets (more than {MAX_CHOICES})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "utils.py", out / "utils.py")
    for task in names:
        sub = task.removeprefix(TASK_PREFIX)
        (out / f"{task}.yaml").write_text(task_yaml(sub, Path(data_dir) / f"{sub}.json"))
    return list(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="print every subtask, its set size and whether it qualifies")
    group.add_argument("--write", type=Path, metavar="DIR", help="write the qualifying tasks' YAMLs into DIR")
    args = parser.parse_args()
    try:
        if args.list:
            for name, choices in task_sets(args.data_dir).items():
                mark = TASK_PREFIX + name if len(choices) <= MAX_CHOICES else f"({name}: not multiple choice)"
                print(f"{len(choices):4d}  {mark}")
        else:
            print("\n".join(write_task_dir(args.write, data_dir=args.data_dir)))
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
