"""cli/output.py: -o json|yaml print the full resource; piped tables keep every character."""

from __future__ import annotations

import io
import json

import yaml
from rich.console import Console

from cli import output
from cli.output import OutputFormat, emit, new_table, render
from modelyard.registry.v1 import registry_pb2 as pb

LONG = "models/" + "smollm2-shout-lora-" * 8 + "/versions/v1"


def _version() -> pb.ModelVersion:
    return pb.ModelVersion(name=LONG, kind=pb.MODEL_KIND_ADAPTER, labels={"team": "nlp"},
                           lineage=pb.Lineage(base_model_version="models/smollm2/versions/base"))


def test_json_and_yaml_carry_every_field_with_proto_names_and_enum_names():
    for fmt, load in ((OutputFormat.json, json.loads), (OutputFormat.yaml, yaml.safe_load)):
        data = load(render([_version()], fmt))
        assert isinstance(data, list) and len(data) == 1
        item = data[0]
        assert item["name"] == LONG
        assert item["kind"] == "MODEL_KIND_ADAPTER"
        assert item["lineage"]["base_model_version"] == "models/smollm2/versions/base"
        assert item["labels"] == {"team": "nlp"}
        assert "deployed_by" in item and "description" in item  # unset fields are printed too: stable keys


def test_one_message_prints_as_one_object_and_keys_are_sorted():
    text = render(_version(), OutputFormat.json)
    data = json.loads(text)
    assert data["name"] == LONG
    assert list(data) == sorted(data)


def test_emit_json_writes_plain_stdout_and_never_calls_the_table(capsys):
    def table():
        raise AssertionError("the table is only built for -o table")

    emit([_version()], "json", table)
    assert json.loads(capsys.readouterr().out)[0]["name"] == LONG


def test_piped_console_never_truncates_or_wraps(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(output.sys, "stdout", buffer)
    console = output.make_console()
    assert isinstance(console, Console) and not console.is_terminal
    table = new_table("version", "base")
    table.add_row(LONG, "models/smollm2/versions/base")
    emit([_version()], "table", lambda: table, console=console)
    lines = buffer.getvalue().splitlines()
    row = next(line for line in lines if "smollm2-shout" in line)
    assert LONG in row  # whole, on one line
    assert "…" not in buffer.getvalue()
