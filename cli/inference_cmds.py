"""``yard deploy``, ``yard deployments ...`` and ``yard chat``: the inference service from the command line.

Every command talks gRPC to the inference service at ``YARD_INFERENCE_ADDR`` (default
127.0.0.1:50055); ``yard chat`` too (straight to the service, so it works without the gateway and
without an API key). Errors print one line with the message and the ErrorInfo reason and exit 1.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import typer
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.table import Table

from cli.common import client_command, fail
from cli.output import OutputFormat, OutputOption, emit, make_console, new_table
from modelyard.client import InferenceClient
from modelyard.inference.v1 import inference_pb2 as pb

console = make_console()
err_console = make_console(stderr=True)

deploy_app = typer.Typer(help="Deploy a model version on an engine.",
                         context_settings={"allow_interspersed_args": True})
deployments_app = typer.Typer(help="Deployments: list, show, delete.", no_args_is_help=True)

ENGINES = {"vllm": pb.ENGINE_VLLM, "transformers": pb.ENGINE_TRANSFORMERS}
DTYPES = {"auto": pb.DTYPE_UNSPECIFIED, "bfloat16": pb.DTYPE_BFLOAT16, "float16": pb.DTYPE_FLOAT16,
          "float32": pb.DTYPE_FLOAT32}
FINAL_STATES = {pb.DEPLOYMENT_STATE_READY, pb.DEPLOYMENT_STATE_FAILED}


class InferenceClientSettings(BaseSettings):
    """Where the CLI finds the inference service."""

    model_config = SettingsConfigDict(env_prefix="YARD_INFERENCE_", extra="ignore")

    addr: str = "127.0.0.1:50055"


_fail = fail
command = client_command("inference service", lambda: InferenceClient(InferenceClientSettings().addr, timeout=120))


def version_name(text: str) -> str:
    """``models/m/versions/v`` or the short ``m/v``."""
    if text.startswith("models/"):
        return text
    model, sep, version = text.partition("/")
    if not sep or not model or not version or "/" in version:
        _fail(f"model version {text!r}: expected MODEL/VERSION or models/MODEL/versions/VERSION")
    return f"models/{model}/versions/{version}"


def deployment_name(text: str) -> str:
    return text if text.startswith("deployments/") else f"deployments/{text}"


def _state(d: pb.Deployment) -> str:
    return pb.DeploymentState.Name(d.state).removeprefix("DEPLOYMENT_STATE_")


def _show(d: pb.Deployment) -> None:
    console.print(_detail(d))


def _detail(d: pb.Deployment) -> Table:
    table = Table(show_header=False, box=None)
    table.add_row("name", d.name)
    table.add_row("state", _state(d))
    table.add_row("model version", d.model_version)
    table.add_row("engine", pb.Engine.Name(d.engine).removeprefix("ENGINE_").lower())
    table.add_row("served as", d.served_model_name)
    if d.options.tool_call_parser:
        table.add_row("tool-call parser", d.options.tool_call_parser)
    for a in d.adapters:
        table.add_row("adapter", f"{a.alias} = {a.model_version}")
    table.add_row("created", d.create_time.ToDatetime().isoformat(timespec="seconds") + "Z")
    if d.error.message:
        table.add_row("last error", d.error.message)
    return table


@deploy_app.callback(invoke_without_command=True)
@command
async def deploy(
    client: InferenceClient,
    model_version: Annotated[str, typer.Argument(help="MODEL/VERSION or models/MODEL/versions/VERSION.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Deployment id (lowercase, digits, hyphens).")],
    engine: Annotated[str, typer.Option("--engine", help="vllm or transformers.")] = "vllm",
    adapter: Annotated[list[str] | None, typer.Option("--adapter", help="LoRA adapter ALIAS=MODEL/VERSION "
                                                                         "(repeatable).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto, bfloat16, float16 or float32.")] = "auto",
    max_model_len: Annotated[int, typer.Option("--max-model-len", help="Context length (0: the model's).")] = 0,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", help="Sequences batched together.")] = 0,
    kv_cache_gib: Annotated[float, typer.Option("--kv-cache-gib", help="KV cache size (0: engine default).")] = 0,
    tool_call_parser: Annotated[str, typer.Option(
        "--tool-call-parser", help="How tool calls are read from the model's text (vLLM parser name, e.g. hermes, "
                                   "llama3_json, mistral; none: no parser). Default: chosen from the model's chat "
                                   "template.")] = "",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until READY or FAILED.")] = True,
) -> None:
    """Deploy MODEL_VERSION as deployment NAME and wait until it answers."""
    if engine not in ENGINES:
        _fail(f"--engine: must be one of {', '.join(ENGINES)}, got {engine!r}")
    if dtype not in DTYPES:
        _fail(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    adapters = []
    for item in adapter or []:
        alias, sep, version = item.partition("=")
        if not sep or not alias:
            _fail(f"--adapter {item!r}: expected ALIAS=MODEL/VERSION")
        adapters.append(pb.Adapter(alias=alias, model_version=version_name(version)))
    d = await client.deploy(pb.Deployment(
        model_version=version_name(model_version), engine=ENGINES[engine], adapters=adapters,
        options=pb.EngineOptions(dtype=DTYPES[dtype], max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                 kv_cache_bytes=int(kv_cache_gib * 1024**3), tool_call_parser=tool_call_parser)),
        deployment_id=name)
    if not wait:
        _show(d)
        return
    start = time.monotonic()
    with console.status(f"{d.name}: starting the {engine} engine...") as status:
        while d.state not in FINAL_STATES:
            await asyncio.sleep(1)
            d = await client.get_deployment(d.name)
            detail = f" (last error: {d.error.message[:120]})" if d.error.message else ""
            status.update(f"{d.name}: {_state(d)} {time.monotonic() - start:.0f}s{detail}")
    _show(d)
    if d.state == pb.DEPLOYMENT_STATE_FAILED:
        raise typer.Exit(1)


@deployments_app.command("list")
@command
async def list_deployments(
    client: InferenceClient,
    state: Annotated[str | None, typer.Option("--state", help="Only this state, e.g. READY.")] = None,
    output: OutputOption = OutputFormat.table,
) -> None:
    """List deployments."""
    flt = f"state = {state.upper()}" if state else ""
    deployments = [d async for d in client.iter_deployments(filter=flt)]

    def table() -> Table:
        rows = new_table("name", "state", "engine", "model version", "adapters", "error")
        for d in deployments:
            rows.add_row(d.name.removeprefix("deployments/"), _state(d),
                         pb.Engine.Name(d.engine).removeprefix("ENGINE_").lower(), d.model_version,
                         ", ".join(a.alias for a in d.adapters), d.error.message[:60])
        return rows

    emit(deployments, output, table, console=console)


@deployments_app.command("show")
@command
async def show_deployment(client: InferenceClient, name: Annotated[str, typer.Argument(help="Deployment id.")],
                          output: OutputOption = OutputFormat.table) -> None:
    """Show one deployment."""
    d = await client.get_deployment(deployment_name(name))
    emit(d, output, lambda: _detail(d), console=console)


@deployments_app.command("delete")
@command
async def delete_deployment(client: InferenceClient,
                            name: Annotated[str, typer.Argument(help="Deployment id.")]) -> None:
    """Stop a deployment's engine and delete it."""
    d = await client.undeploy(deployment_name(name))
    console.print(f"deleted {d.name}")


@command
async def chat(
    client: InferenceClient,
    name: Annotated[str, typer.Argument(help="Deployment id.")],
    adapter: Annotated[str, typer.Option("--adapter", help="Alias of one of the deployment's adapters.")] = "",
    system: Annotated[str, typer.Option("--system", help="System prompt.")] = "",
    message: Annotated[str | None, typer.Option("--message", "-m", help="Send one message, print the answer "
                                                                          "and exit (no prompt).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Longest answer in tokens.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = 0.7,
) -> None:
    """Chat with deployment NAME (streaming). Empty line, /exit or Ctrl-D leaves."""
    history: list[pb.ChatMessage] = []
    if system:
        history.append(pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content=system))
    interactive = message is None
    while True:
        if interactive:
            try:
                text = await asyncio.to_thread(console.input, "[bold green]you>[/] ")
            except EOFError:
                return
            if not text.strip() or text.strip() == "/exit":
                return
        else:
            text = message or ""
        history.append(pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=text))
        answer = []
        if interactive:
            console.print("[bold blue]model>[/] ", end="")
        async for chunk in client.chat(deployment=deployment_name(name), adapter=adapter, messages=history,
                                       sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=temperature)):
            for choice in chunk.choices:
                answer.append(choice.content)
                console.print(choice.content, end="", markup=False, highlight=False, soft_wrap=True)
        console.print()
        history.append(pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, content="".join(answer)))
        if not interactive:
            return
