"""The transformers engine's continuous batching (``scheduler.Scheduler``) on a real tiny model:
requests that join and leave a running batch get the same greedy tokens as when each runs alone."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli.demo_models import build_tiny_model
from services.inference.engines.scheduler import GenRequest, Sampling, Scheduler

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["Hello", "The capital of France is", "a b c d e f g h", "Once upon a time there was",
           "1 2 3", "What is the weather like today in the city?", "x", "Tell me a story about a fox"]
MAX_TOKENS = [3, 9, 1, 14, 5, 7, 2, 11]


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


async def _answer(req: GenRequest) -> tuple[list[int], list[float], str | None]:
    """The request's tokens, their log-probabilities (these show a wrong KV cache row even where
    a random model's greedy token would not) and its finish reason."""
    tokens: list[int] = []
    logprobs: list[float] = []
    while True:
        event = await req.events.get()
        if event.kind == "error":
            raise AssertionError(event.message)
        tokens += [t.token_id for t in event.tokens]
        logprobs += [t.logprob for t in event.tokens]
        if event.finish_reason:
            return tokens, logprobs, event.finish_reason


def _request(tok, i: int, loop) -> GenRequest:
    return GenRequest(tok(PROMPTS[i])["input_ids"], Sampling(max_tokens=MAX_TOKENS[i], temperature=0.0,
                                                             logprobs=True, ignore_eos=True), loop=loop)


async def test_requests_joining_and_leaving_a_batch_get_their_solo_answers(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    loop = asyncio.get_running_loop()

    alone = Scheduler(model, tok, max_num_seqs=1, eos_ids={tok.eos_token_id})
    alone.start()
    try:
        solo = []
        for i in range(len(PROMPTS)):
            req = _request(tok, i, loop)
            alone.submit(req)
            solo.append(await _answer(req))
    finally:
        alone.stop()
    assert [len(t) for t, _, _ in solo] == MAX_TOKENS and {r for _, _, r in solo} == {"length"}

    # Four rows for eight requests: rows finish while others wait, so finished rows are dropped in
    # the copy the next admission makes (recorded below), and late arrivals join a running batch.
    merged_with_finished_rows = []
    original_merge = Scheduler._merge

    def spy(self, seqs, cache, mask):
        merged_with_finished_rows.append(sum(s.pending is None for s in self._seqs))
        return original_merge(self, seqs, cache, mask)

    monkeypatch.setattr(Scheduler, "_merge", spy)
    batched = Scheduler(model, tok, max_num_seqs=4, eos_ids={tok.eos_token_id})
    batched.start()
    try:
        reqs = [_request(tok, i, loop) for i in range(len(PROMPTS))]
        for req in reqs:  # more than fit: the rest join the running batch as rows free up
            batched.submit(req)
        got = await asyncio.gather(*(_answer(req) for req in reqs))
        assert batched.running == 0
    finally:
        batched.stop()
    for i, (want, have) in enumerate(zip(solo, got, strict=True)):
        assert have[0] == want[0] and have[2] == want[2], f"request {i} ({PROMPTS[i]!r}): batched {have} != alone {want}"
        assert have[1] == pytest.approx(want[1], abs=1e-4), f"request {i} ({PROMPTS[i]!r}): log-probabilities differ"
    assert any(merged_with_finished_rows), merged_with_finished_rows
