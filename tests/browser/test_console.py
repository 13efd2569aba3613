"""The web console at /console in Chromium, through the real path: the page's own JavaScript calls the console
API (session cookie) and the gateway's /v1 API (bearer key), which call the real services.

Screenshots land in test-artifacts/console/ (sign-in, models, signin-error, service-down, chat-stream,
compare, lineage, job-chart, pipeline-running, pipeline-report)."""

from __future__ import annotations

import os
import re
import time

import httpx
import pytest
from playwright.sync_api import Page, expect

from modelyard.common.v1 import common_pb2 as cpb
from modelyard.pipeline.v1 import pipeline_pb2 as ppb
from tests.support.pipeline_stack import TERMINAL, wait_run
from tests.support.training_stack import wait_state

from .console_stack import ADMIN_TOKEN, CHROMIUM, ConsoleStack

pytestmark = [
    pytest.mark.skipif(  # `make test` sets YARD_REQUIRE_BROWSER=1 (and installs Chromium): a missing one fails there
        not CHROMIUM.exists() and not os.environ.get("YARD_REQUIRE_BROWSER"),
        reason=f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium); these tests drive it "
        "and never download a browser",
    ),
    pytest.mark.timeout(300),
]


def sign_in(page: Page, secret: str) -> None:
    page.goto("/console")
    page.fill("#signin-key", secret)
    page.click("#signin-submit")


def signed_in(page: Page, stack: ConsoleStack, secret: str) -> None:
    sign_in(page, secret)
    expect(page.locator("#signed-in-as")).to_be_visible()


def no_page_errors(page: Page) -> None:
    assert not page.console_errors, page.console_errors


# ----------------------------------------------------------------------------- signing in


def test_admin_token_signs_in_to_the_models_page(page: Page, stack: ConsoleStack, artifacts):
    stack.wait("base")
    sign_in(page, ADMIN_TOKEN)
    expect(page.locator("h1")).to_have_text("Models")
    expect(page.locator("#signed-in-as")).to_contain_text("admin")
    row = page.locator('tr[data-name="models/tiny"]')
    expect(row).to_be_visible()
    assert page.url.endswith("/console/models")
    cookie = next(c for c in page.context.cookies() if c["name"] == "yard_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    page.screenshot(path=artifacts / "models.png", full_page=True)

    row.locator("a").click()  # the model's page lists its versions
    expect(page.locator("h1")).to_have_text("tiny")
    expect(page.locator('tr[data-name="models/tiny/versions/base"]')).to_be_visible()

    page.click("#sign-out")
    expect(page.locator("#signin-key")).to_be_visible()
    assert page.request.get("/console/api/models").status == 401
    no_page_errors(page)


def test_api_key_signs_in_and_the_session_survives_a_reload(page: Page, stack: ConsoleStack, artifacts):
    stack.wait("base")
    page.goto("/console")
    page.fill("#signin-key", stack.api_key["key"])
    page.screenshot(path=artifacts / "sign-in.png")
    page.click("#signin-submit")
    expect(page.locator("h1")).to_have_text("Models")
    expect(page.locator("#signed-in-as")).to_contain_text(f"console-test ({stack.api_key['prefix']}")
    page.reload()
    expect(page.locator('tr[data-name="models/tiny"]')).to_be_visible()
    # the cookie is the session: the key itself never leaves the tab's sessionStorage for the console API
    assert page.evaluate("sessionStorage.getItem('yard.console.chatKey')") == stack.api_key["key"]
    no_page_errors(page)


def test_revoking_the_key_ends_its_console_session(page: Page, stack: ConsoleStack):
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    key = httpx.post(f"{stack.url}/admin/keys", json={"name": "short-lived"}, headers=admin, timeout=30).json()
    signed_in(page, stack, key["key"])
    expect(page.locator("h1")).to_have_text("Models")
    revoked = httpx.post(f"{stack.url}/admin/keys/{key['id']}/revoke", headers=admin, timeout=30)
    assert revoked.status_code == 200, revoked.text
    time.sleep(0.6)  # the gateway's auth.cache_ttl_s in this stack
    page.click("text=Datasets")
    expect(page.locator("#signin-error")).to_contain_text("was revoked")
    expect(page.locator("#signin-key")).to_be_visible()
    assert page.request.get("/console/api/models").status == 401
    no_page_errors(page)


def test_a_wrong_key_shows_a_sign_in_error(page: Page, stack: ConsoleStack, artifacts):
    sign_in(page, "sk-yard-this-is-not-a-key")
    error = page.locator("#signin-error .error")
    expect(error).to_contain_text("Sign-in failed")
    expect(error).to_contain_text("neither an active API key")
    expect(page.locator("#signin-key")).to_be_visible()
    page.screenshot(path=artifacts / "signin-error.png")
    assert not [c for c in page.context.cookies() if c["name"] == "yard_console"]
    page.fill("#signin-key", "not even the shape of a key")
    page.click("#signin-submit")
    expect(error).to_contain_text("Sign-in failed")
    no_page_errors(page)


# ----------------------------------------------------------------------------- errors, not blank pages


def test_a_service_that_is_down_shows_an_error_not_a_blank_page(page: Page, stack: ConsoleStack, artifacts):
    stack.wait("long_job_created")
    signed_in(page, stack, ADMIN_TOKEN)
    page.goto("/console/jobs")
    quantization = page.locator('.error[data-service="quantization"]')
    expect(quantization).to_contain_text("quantization service unavailable")
    expect(quantization).to_contain_text(stack.down["quantization"])
    expect(page.locator(".error[data-service]")).to_have_count(1)  # only the quantization service is down
    # the services that answer are still listed
    expect(page.locator('tr[data-name="trainingJobs/long-lora"]')).to_be_visible()
    expect(page.locator('tr[data-kind="import"]').first).to_be_visible()
    page.screenshot(path=artifacts / "service-down.png", full_page=True)

    page.goto("/console/jobs/quantizationJobs/nope")  # a page whose only service is down
    box = page.locator("main .error")
    expect(box).to_contain_text("Service unavailable (503)")
    expect(box).to_contain_text("quantization service unavailable")
    expect(box.locator("button", has_text="Retry")).to_be_visible()

    page.goto("/console/jobs/trainingJobs/no-such-job")  # a 404 of the service, shown as such
    expect(page.locator("main .error")).to_contain_text("Not found (404)")

    page.goto("/console/models")
    expect(page.locator("h1")).to_have_text("Models")
    page.context.set_offline(True)  # the gateway unreachable: a network error, shown
    try:
        page.click("text=Datasets")
        expect(page.locator("main .error")).to_contain_text("Could not reach the gateway")
    finally:
        page.context.set_offline(False)
    page.locator("main .error button", has_text="Retry").click()
    expect(page.locator("h1")).to_have_text("Datasets")
    no_page_errors(page)


# ----------------------------------------------------------------------------- the chat playground


def test_the_playground_streams_a_reply_through_the_openai_api(page: Page, stack: ConsoleStack, artifacts):
    stack.wait("deployment")
    signed_in(page, stack, stack.api_key["key"])
    page.click("text=Deployments")
    row = page.locator('tr[data-name="deployments/tiny"]')
    expect(row.locator(".badge")).to_have_text("READY")
    page.screenshot(path=artifacts / "deployments.png")
    row.locator("a", has_text="Chat").click()
    expect(page.locator("#chat-model")).to_have_value("tiny", timeout=30_000)
    page.fill("#chat-max-tokens", "200")
    page.fill("#chat-seed", "7")  # sampled, but the same reply every run
    page.fill("#chat-input", "Tell me a long story about a shouting llama.")
    # every change of the reply's text, as the page shows it
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const reply = document.querySelector('#chat-reply .text');
            if (reply) window.__lengths.push(reply.textContent.length);
        }).observe(document.getElementById('transcript'), {subtree: true, childList: true, characterData: true});
    }""")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(f"{r.method} {r.url}"))
    page.click("#chat-send")
    reply = page.locator("#chat-reply")
    expect(reply).to_have_attribute("data-done", "true", timeout=60_000)
    expect(page.locator("#chat-error")).to_be_empty()
    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    chunks = int(reply.get_attribute("data-chunks") or 0)
    assert chunks >= 2, f"the reply came in {chunks} chunk(s)"
    assert len(set(lengths)) >= 2 and lengths == sorted(lengths), lengths  # it grew, in steps
    assert len(reply.locator(".text").inner_text()) == max(lengths)
    expect(page.locator("#chat-stats")).to_contain_text("completion tokens")
    assert any(r == f"POST {stack.url}/v1/chat/completions" for r in requests), requests
    page.screenshot(path=artifacts / "chat-stream.png", full_page=True)
    no_page_errors(page)


def test_the_admin_playground_mints_a_key_of_its_own(page: Page, stack: ConsoleStack):
    stack.wait("deployment")
    signed_in(page, stack, ADMIN_TOKEN)
    page.goto("/console/playground?model=tiny")
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-input", "hi")
    page.click("#chat-send")
    expect(page.locator("#chat-reply")).to_have_attribute("data-done", "true", timeout=60_000)
    expect(page.locator("#chat-error")).to_be_empty()
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    keys = httpx.get(f"{stack.url}/admin/keys", headers=admin, timeout=30).json()["data"]
    minted = [k for k in keys if k["name"] == "console-admin" and k["revoked_at"] is None]
    assert len(minted) == 1, keys
    page.click("#sign-out")
    expect(page.locator("#signin-key")).to_be_visible()
    keys = httpx.get(f"{stack.url}/admin/keys", headers=admin, timeout=30).json()["data"]
    assert [k["revoked_at"] for k in keys if k["id"] == minted[0]["id"]] != [None]  # revoked at sign-out
    no_page_errors(page)


# ----------------------------------------------------------------------------- evaluations side by side


def test_two_evaluations_compare_side_by_side(page: Page, stack: ConsoleStack, artifacts):
    first, second = stack.wait("evaluations")
    signed_in(page, stack, ADMIN_TOKEN)
    page.click("text=Evaluations")
    for name in (first, second):
        expect(page.locator(f'tr[data-name="{name}"] .badge')).to_have_text("SUCCEEDED")
        page.check(f'input[data-evaluation="{name.split("/")[1]}"]')
    page.click("#compare-selected")
    expect(page).to_have_url(re.compile(r"/console/evaluations/compare\?names="))
    expect(page.locator("h1")).to_have_text("Comparing 2 evaluations")
    table = page.locator("#comparison table")
    for name in (first, second):
        expect(table.locator("thead")).to_contain_text(name.split("/")[1])
    row = table.locator('tr[data-benchmark="bbh_mc:boolean_expressions"][data-metric="acc"]')
    expect(row).to_have_count(1)
    cells = row.locator("td.num")
    expect(cells).to_have_count(2)
    for i in range(2):
        assert re.match(r"^\d", cells.nth(i).inner_text()), cells.nth(i).inner_text()
    expect(cells.nth(1)).to_contain_text("Δ")  # the paired delta against the first, with its interval
    page.screenshot(path=artifacts / "compare.png", full_page=True)

    table.locator("thead a").first.click()  # an evaluation's own page: its results
    expect(page.locator("#live-status")).to_contain_text("finished (SUCCEEDED)")
    expect(page.locator("main table").first).to_contain_text("bbh_mc:boolean_expressions")
    no_page_errors(page)


# ----------------------------------------------------------------------------- datasets


def test_a_dataset_version_shows_its_validation_report(page: Page, stack: ConsoleStack, artifacts):
    dataset, base = stack.wait("dataset"), stack.wait("base")
    signed_in(page, stack, stack.api_key["key"])
    page.click("text=Datasets")
    page.locator('tr[data-name="datasets/shout"] a').click()
    page.locator(f'tr[data-name="{dataset}"] a').click()
    report = page.locator("#validation")
    expect(report).to_contain_text("rows are valid")
    expect(report).to_contain_text("messages")
    page.fill('input[name="model_version"]', base)  # token statistics with the base model's tokenizer
    page.fill('input[name="max_length"]', "16")
    page.click("text=Measure tokens")
    expect(report).to_contain_text("Tokens per row")
    expect(report).to_contain_text("Rows over max length")
    adapter = stack.wait("adapter")[1]  # what was trained on it, from the lineage
    expect(page.locator(f'#lineage g.node[data-id="{adapter}"]')).to_be_visible()
    page.screenshot(path=artifacts / "dataset.png", full_page=True)
    no_page_errors(page)


# ----------------------------------------------------------------------------- lineage


def test_a_model_version_shows_its_lineage_graph(page: Page, stack: ConsoleStack, artifacts):
    job, adapter = stack.wait("adapter")
    base, dataset = stack.wait("base"), stack.wait("dataset")
    signed_in(page, stack, stack.api_key["key"])
    page.goto("/console/models/tiny-shout")
    page.locator(f'tr[data-name="{adapter}"] a').first.click()
    graph = page.locator("#lineage svg")
    expect(graph).to_be_visible()
    nodes = {name: graph.locator(f'g.node[data-id="{name}"]') for name in (base, dataset, job, adapter)}
    for node in nodes.values():
        expect(node).to_be_visible()
    for parent, child in ((base, job), (dataset, job), (job, adapter)):
        expect(graph.locator(f'path.edge[data-from="{parent}"][data-to="{child}"]')).to_have_count(1)
    x = {name: node.bounding_box()["x"] for name, node in nodes.items()}
    assert x[base] < x[job] < x[adapter] and x[dataset] < x[job], x  # left to right by generation
    expect(nodes[adapter]).to_have_class(re.compile(r"\bfocus\b"))
    expect(nodes[dataset]).to_contain_text("dataset")
    page.screenshot(path=artifacts / "lineage.png", full_page=True)

    nodes[job].click()  # the job's node opens the job
    expect(page).to_have_url(re.compile(f"/console/jobs/{job}$"))
    expect(page.locator("#job-state .badge")).to_have_text("SUCCEEDED")
    expect(page.locator("#live-status")).to_contain_text("finished (SUCCEEDED)")
    no_page_errors(page)


# ----------------------------------------------------------------------------- a running job, live


def test_a_running_training_job_draws_its_loss_live(page: Page, stack: ConsoleStack, artifacts):
    name = stack.wait("long_job_created")
    job = stack.run(wait_state(stack.services.training, name, {cpb.JOB_STATE_RUNNING}, 240), timeout=250)
    assert job.state == cpb.JOB_STATE_RUNNING
    signed_in(page, stack, ADMIN_TOKEN)
    page.goto("/console/jobs?kind=training")
    page.locator(f'tr[data-name="{name}"] a').first.click()
    expect(page.locator("#job-state .badge")).to_have_text("RUNNING")
    expect(page.locator("#live-status")).to_have_text("live")
    loss = page.locator('svg[data-chart="loss"]')
    page.wait_for_function(
        "() => Number(document.querySelector('svg[data-chart=loss]').dataset.points) >= 5", timeout=120_000
    )
    seen = [(int(loss.get_attribute("data-points")), float(loss.get_attribute("data-max-x")))]
    for _ in range(2):  # two more looks, a second apart: the chart keeps growing while the job trains
        time.sleep(1.0)
        seen.append((int(loss.get_attribute("data-points")), float(loss.get_attribute("data-max-x"))))
    steps = [s for _, s in seen]
    assert steps == sorted(steps) and steps[-1] > steps[0], seen
    assert seen[-1][0] > seen[0][0] or seen[-1][0] > 1000, seen  # more points (or thinned past 2000)
    expect(loss.locator("path.series")).to_have_count(1)
    progress = page.locator('svg[data-chart="progress"]')
    assert int(progress.get_attribute("data-points")) > 0
    expect(page.locator("#job-log")).to_contain_text("state QUEUED → RUNNING")
    page.screenshot(path=artifacts / "job-chart.png", full_page=True)

    stack.run(stack.services.training.cancel_training_job(name))  # the stream ends with the job
    expect(page.locator("#live-status")).to_contain_text("finished (CANCELLED)", timeout=60_000)
    expect(page.locator("#job-state .badge")).to_have_text("CANCELLED")
    no_page_errors(page)


# ----------------------------------------------------------------------------- a pipeline run, live, then its report

PIPELINE = """
name: console-flow
params: {base: null, dataset: null}
steps:
  - {id: base, type: model, version: "${params.base}"}
  - {id: data, type: dataset, version: "${params.dataset}"}
  - id: sft
    type: sft
    model: ${steps.base.model_version}
    datasets: ["${steps.data.dataset_version}"]
    output_model: tiny-flow
    merge: true
    log_every_steps: 1
    hyperparameters: {max_steps: SFT_STEPS, batch_size: 2, gradient_accumulation_steps: 1, max_length: 64,
                      learning_rate: 1e-3, lora_rank: 4, precision: fp32}
  - id: eval
    type: eval
    engine: transformers
    targets: {base: "${steps.base.model_version}", tuned: "${steps.sft.merged_model_version}"}
    benchmarks: [bbh_mc:boolean_expressions]
    limit: 4
    decode: {requests: 1, max_tokens: 8}
"""
SFT_STEPS = 300  # the tiny model trains about 40 steps a second: several seconds of a running step to watch


def free_training_slot(stack: ConsoleStack) -> None:
    """The long job holds the training service's one worker slot until the chart test cancels it; run on its own,
    this test cancels it."""
    name = stack.wait("long_job_created")
    training = stack.services.training
    if stack.run(training.get_training_job(name)).state not in TERMINAL:
        stack.run(training.cancel_training_job(name))
    stack.run(wait_state(training, name, TERMINAL, 60), timeout=70)


def step_of(run: ppb.PipelineRun, step: str) -> ppb.StepStatus:
    return next(s for s in run.steps if s.id == step)


def test_a_pipeline_run_shows_its_steps_live_and_then_its_report(page: Page, stack: ConsoleStack, artifacts):
    base, dataset = stack.wait("base"), stack.wait("dataset")
    free_training_slot(stack)
    source = PIPELINE.replace("SFT_STEPS", str(SFT_STEPS))
    run = stack.run(stack.pipeline.create_pipeline_run(
        source, params={"base": base, "dataset": dataset}, run_id="console-flow"))  # fmt: skip
    # the sft step's training job is running (the steps before it are done)
    run = stack.run(wait_run(stack.pipeline, run.name, timeout=120,
                             until=lambda r: step_of(r, "sft").state == ppb.STEP_STATE_RUNNING
                             and step_of(r, "sft").resource.startswith("trainingJobs/")), timeout=130)  # fmt: skip
    job = step_of(run, "sft").resource
    stack.run(wait_state(stack.services.training, job, {cpb.JOB_STATE_RUNNING}, 60), timeout=70)

    signed_in(page, stack, ADMIN_TOKEN)
    page.goto("/console/jobs?kind=pipeline")
    row = page.locator(f'tr[data-name="{run.name}"]')
    expect(row.locator(".badge").first).to_have_text("pipeline")
    expect(row).to_contain_text("running sft")
    row.locator("a").first.click()
    expect(page).to_have_url(re.compile(f"/console/jobs/{run.name}$"))
    expect(page.locator("#job-state .badge")).to_have_text("RUNNING")
    expect(page.locator("#live-status")).to_have_text("live")
    steps = page.locator("#pipeline-steps")
    for step, state in (("base", "SUCCEEDED"), ("data", "SUCCEEDED"), ("sft", "RUNNING"), ("eval", "PENDING")):
        expect(steps.locator(f'tr[data-step="{step}"] .badge')).to_have_text(state)
    expect(steps.locator('tr[data-step="sft"]')).to_contain_text(job)
    # the sft step's loss (relayed by the run as sft.loss) and its progress, growing while it trains
    loss = page.locator('svg[data-chart="loss"]')
    page.wait_for_function(
        "() => Number(document.querySelector('svg[data-chart=loss]').dataset.points) >= 3", timeout=60_000
    )
    sft_progress = steps.locator('tr[data-step="sft"] [data-fraction]')
    seen = [(int(loss.get_attribute("data-points")), float(sft_progress.get_attribute("data-fraction")))]
    for _ in range(2):
        time.sleep(1.0)
        seen.append((int(loss.get_attribute("data-points")), float(sft_progress.get_attribute("data-fraction"))))
    assert seen[-1][0] > seen[0][0], seen  # more loss points
    assert seen[-1][1] > seen[0][1] and seen[-1][1] < 1, seen  # the step's fraction moves, shown in its row
    expect(loss.locator("path.series")).to_have_count(1)
    assert int(page.locator('svg[data-chart="progress"]').get_attribute("data-points")) > 0
    expect(page.locator("#job-log")).to_contain_text("step sft started")
    page.screenshot(path=artifacts / "pipeline-running.png", full_page=True)

    # the end: every step succeeded, and the report
    expect(page.locator("#live-status")).to_contain_text("finished (SUCCEEDED)", timeout=240_000)
    expect(page.locator("#job-state .badge")).to_have_text("SUCCEEDED")
    for step in ("base", "data", "sft", "eval"):
        expect(steps.locator(f'tr[data-step="{step}"] .badge')).to_have_text("SUCCEEDED")
    done = stack.run(stack.pipeline.get_pipeline_run(run.name))
    assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error.message
    report = page.locator("#pipeline-report")
    expect(page.locator("#report-title")).to_contain_text("bbh_mc:boolean_expressions")
    expect(report.locator("tbody tr")).to_have_count(2)
    for row_label, want in zip(("base", "tuned"), done.outputs.report.rows, strict=True):
        assert want.label == row_label
        cells = report.locator(f'tr[data-label="{row_label}"]')
        expect(cells.locator("td.score")).to_contain_text(re.compile(r"^\d(\.\d+)? ±\d"))
        expect(cells.locator("td.size")).to_contain_text(re.compile(r"\d (B|KiB|MiB)$"))
        expect(cells.locator("td.decode")).to_have_text(re.compile(r"^\d+\.\d$"))
        score = float(cells.locator("td.score").inner_text().split(" ±")[0])
        decode = float(cells.locator("td.decode").inner_text())
        assert abs(score - want.score) < 1e-3 and decode > 0 and abs(decode - want.decode_tokens_per_second) < 0.06
        expect(cells).to_contain_text(want.model_version)
        expect(cells).to_contain_text(want.evaluation)
    delta = page.locator('#pipeline-deltas tr[data-label="tuned"]')
    expect(delta).to_contain_text("base")
    expect(delta.locator("td.interval")).to_contain_text(re.compile(r"^\[[-+]?\d.*, [-+]?\d.*\]$"))
    assert abs(float(delta.locator("td.delta").inner_text()) - done.outputs.report.deltas[0].delta) < 1e-3
    times = page.locator("#pipeline-times")
    for step in ("base", "data", "sft", "eval"):
        expect(times.locator(f'tr[data-step="{step}"] td.num')).to_have_text(re.compile(r"\d s$|min"))
    expect(page.locator("#report-notes")).to_contain_text("tuned - base")
    page.screenshot(path=artifacts / "pipeline-report.png", full_page=True)
    no_page_errors(page)
