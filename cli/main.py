"""The ``yard`` command.

Top-level stack commands (``up``, ``down``, ``status``) come from ``cli.stack``; every other
area is a ``typer.Typer()`` group added here with ``app.add_typer(group, name=...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.output import make_console
from cli.stack import stack_app
from services.core.errors import DomainError
from services.core.logging import configure_logging

app = typer.Typer(help="ModelYard: bring a model in, fine-tune, quantize, evaluate and serve it.", no_args_is_help=True)
console = make_console()  # a piped path is never wrapped (scripts read it)


@app.callback()
def main(
    log_level: Annotated[str, typer.Option("--log-level", help="Log level of the CLI's own logs.")] = "WARNING",
) -> None:
    """ModelYard command line."""
    configure_logging(level=log_level, json=False)


app.add_typer(stack_app)

from cli.registry_cmds import datasets_app, models_app  # noqa: E402

app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")

from cli.gateway_cmds import keys_app, projects_app, usage  # noqa: E402

app.add_typer(keys_app, name="keys")
app.add_typer(projects_app, name="projects")
app.command("usage")(usage)

from cli.training_cmds import jobs_app, train_app  # noqa: E402

app.add_typer(train_app, name="train")
app.add_typer(jobs_app, name="jobs")

from cli.quantization_cmds import quantize  # noqa: E402

app.command("quantize")(quantize)

from cli.eval_cmds import eval_app  # noqa: E402

app.add_typer(eval_app, name="eval")

from cli.pipeline_cmds import pipeline_app  # noqa: E402

app.add_typer(pipeline_app, name="pipeline")

from cli.inference_cmds import chat, deploy_app, deployments_app  # noqa: E402

app.add_typer(deploy_app, name="deploy")
app.add_typer(deployments_app, name="deployments")
app.command("chat")(chat)


@models_app.command("fetch-demo")
def fetch_demo(
    dest: Annotated[Path | None, typer.Option("--dest", help="Folder to build into (default: the model cache).")] = None,
) -> None:
    """Build SmolLM2-135M-Instruct as a Hugging Face folder from the bundled GGUF (cached)."""
    from cli.demo_models import build_smollm2

    try:
        path = build_smollm2(dest)
    except DomainError as exc:
        make_console(stderr=True).print(f"[red]error:[/] {exc.message}", highlight=False)
        raise typer.Exit(1) from exc
    console.print(str(path), highlight=False)


if __name__ == "__main__":
    app()
