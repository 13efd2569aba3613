"""lm-eval hooks of the ``bbh_mc_<task>`` tasks (copied next to the generated YAMLs by ``bbh_mc.write_task_dir``).

Only the standard library and ``datasets`` (which lm-eval already imports) are used here.
"""

from __future__ import annotations


def closed_set(targets) -> list[str]:
    """The task's answer set: the sorted distinct ``target`` values over all its examples."""
    return sorted({str(t) for t in targets})


def process_docs(dataset):
    """Adds ``choices`` (the closed set of the whole split) and ``gold`` (the index of ``target`` in it).

    The set is computed over the full split before ``--limit`` is applied, so a limited run scores
    against the same choices as a full one.
    """
    choices = closed_set(dataset["target"])
    return dataset.map(lambda doc: {"choices": choices, "gold": choices.index(str(doc["target"]))})
