"""One rank of a launched run: ``python -m services.training.recipes.rank PLAN_JSON`` (started by torchrun).

Rank 0 writes its events to ``events.jsonl`` and its result to ``result.json`` in the job's workdir;
the job's child process relays them. A DomainError is reported as an ``error`` event.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from services.core.errors import DomainError, error_dict

from .events import FileSink, NullSink

EVENTS_FILE = "events.jsonl"
RESULT_FILE = "result.json"
CANCEL_FLAG = "cancel"


def main(argv: list[str]) -> int:
    from .train import Plan, train

    plan = Plan.from_json(Path(argv[0]).read_text())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    workdir = Path(plan.workdir)
    sink = FileSink(workdir / EVENTS_FILE, workdir / CANCEL_FLAG) if rank == 0 else NullSink(workdir / CANCEL_FLAG)
    try:
        result = train(plan, sink, rank=rank, world_size=world)
    except DomainError as e:
        if isinstance(sink, FileSink):
            sink.error(error_dict(e))
        return 1
    if rank == 0:
        (workdir / RESULT_FILE).write_text(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
