"""Continuous batching for the transformers engine.

One scheduler thread owns the model. Requests wait in a queue; between two decode steps the
scheduler prefills newly arrived sequences (left-padded) and merges their KV cache into the
running batch, so requests join and leave the batch step by step. Every step feeds one token per
running sequence, samples per sequence (its own temperature, top-p/top-k, penalties, seed), and
sends events back to the asyncio side. Finished or aborted sequences leave the batch at once.
LoRA adapters are peft adapters; a batch may mix them (peft ``adapter_names``).

Vision-language models: a request with images (``GenRequest.mm_inputs``: the processor's pixel values,
image grid, token types) is prefilled on its own, without padding and without given positions, so the model
places its image tokens itself (Qwen2-VL's 3-D rotary positions); its ``n`` rows then share that one
prefill's cache. A model whose text positions after an image are shifted (Qwen2-VL's ``rope_deltas``) reports
the shift, and each decode step feeds a row's position plus its shift: the batch stays one batch of text
rows and image rows alike.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from services.core.logging import get_logger

log = get_logger(__name__)

BASE_ADAPTER = "__base__"


class RequestError(Exception):
    """A request the engine refuses (HTTP 400)."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False


@dataclass
class TokenInfo:
    """One token with its log-probability (None for a prompt's first token) and alternatives."""

    token_id: int
    text: str
    logprob: float | None
    top: list[tuple[str, float]]


@dataclass
class Event:
    """What the scheduler reports: ``delta`` (text, tokens), ``prompt`` (echo), ``done`` or ``error``."""

    kind: str
    index: int = 0
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""


class GenRequest:
    """A generation request of ``n`` choices; events arrive on ``events`` in the caller's loop."""

    def __init__(self, prompt_ids: list[int], sampling: Sampling, *, n: int = 1, adapter: str | None = None,
                 prompt_logprobs: bool = False, loop: asyncio.AbstractEventLoop, grammar: Any = None,
                 mm_inputs: dict[str, torch.Tensor] | None = None) -> None:
        self.prompt_ids = prompt_ids
        # a vision-language model's image inputs (pixel_values, image_grid_thw, mm_token_type_ids, ...) for
        # ``prompt_ids`` (which hold the image tokens already); None: a text prompt
        self.mm_inputs = mm_inputs
        self.grammar = grammar  # constrained decoding (constrained.Grammar): each choice gets its matcher
        self.sampling = sampling
        self.n = n
        self.adapter = adapter
        self.prompt_logprobs = prompt_logprobs
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.aborted = threading.Event()
        self._loop = loop
        self.remaining = n
        self.completion_tokens = 0

    def emit(self, event: Event) -> None:
        self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    def abort(self) -> None:
        self.aborted.set()


class _Seq:
    """One choice of a request while it runs."""

    def __init__(self, req: GenRequest, index: int, vocab: int) -> None:
        self.req = req
        self.index = index
        self.generated: list[int] = []
        self.pending: int | None = None  # sampled, not yet fed to the model
        self.position = len(req.prompt_ids)
        self.rope_delta = 0  # rotary position of the next token minus ``position`` (images: see the module doc)
        self.text = ""  # decoded text so far (all generated tokens)
        self.sent = 0  # characters of ``text`` already sent
        self.unsent_tokens: list[TokenInfo] = []
        self.counts = torch.zeros(vocab) if _uses_penalties(req.sampling) else None
        self.matcher = req.grammar.matcher() if req.grammar is not None else None
        self.generator: torch.Generator | None = None
        seed = req.sampling.seed
        if seed is not None and req.sampling.temperature > 0:
            self.generator = torch.Generator().manual_seed(int(seed) + index)


def _uses_penalties(s: Sampling) -> bool:
    return bool(s.presence_penalty or s.frequency_penalty)


class Scheduler:
    """Owns the model in one thread; ``submit`` requests, ``call`` other model work (adapters, embeddings)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_num_seqs: int, eos_ids: set[int]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.eos_ids = eos_ids
        self.adapters: dict[str, str] = {}
        self._vocab = model.get_output_embeddings().weight.shape[0]
        # the submodule that keeps the rotary position shift of the last multimodal prefill (Qwen2-VL family)
        self._rope_holder = next((m for m in model.modules() if hasattr(m, "rope_deltas")), None)
        self._incoming: queue.Queue[GenRequest] = queue.Queue()
        self._calls: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seqs: list[_Seq] = []
        self._admitting: list[GenRequest] = []  # taken from the queue, not in the batch yet (failed with it)
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def submit(self, req: GenRequest) -> None:
        self._incoming.put(req)
        self._wake.set()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the scheduler thread between two steps and return its result."""
        fut: Future = Future()
        self._calls.put((fn, fut))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    @property
    def running(self) -> int:
        return sum(1 for s in self._seqs if s.pending is not None)

    @property
    def waiting(self) -> int:
        """Requests submitted and not admitted yet (aborted ones leave at the next step)."""
        return self._incoming.qsize()

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            if not self._seqs and self._incoming.empty() and self._calls.empty():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self._run_calls()
                self._drop_aborted()
                self._admit()
                if self._seqs:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the engine
                log.exception("scheduler_step_failed")
                # every request of the batch (not the rows that finished already) and those being
                # admitted (a failed prefill): each gets one error event, none is left waiting
                failed = {id(s.req): s.req for s in self._seqs if s.pending is not None}
                failed.update((id(r), r) for r in self._admitting)
                for req in failed.values():
                    req.emit(Event("error", message=f"engine step failed: {exc}"))
                self._admitting.clear()
                self._reset_batch()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

    def _reset_batch(self) -> None:
        self._seqs, self._cache, self._mask = [], None, None

    def _drop_aborted(self) -> None:
        if any(s.req.aborted.is_set() for s in self._seqs):
            self._select([i for i, s in enumerate(self._seqs) if s.pending is not None and not s.req.aborted.is_set()])

    # ------------------------------------------------------------------ prefill

    def _admit(self) -> None:
        room = self.max_num_seqs - self.running
        new: list[_Seq] = []
        with_images: list[list[_Seq]] = []  # prefilled one request at a time
        while room > 0:
            try:
                req = self._incoming.get_nowait()
            except queue.Empty:
                break
            if req.aborted.is_set():
                continue
            if req.adapter and req.adapter not in self.adapters:
                req.emit(Event("error", message=f"adapter {req.adapter!r} is not loaded"))
                continue
            self._admitting.append(req)
            seqs = [_Seq(req, i, self._vocab) for i in range(req.n)]
            if req.sampling.max_tokens == 0:
                self._prefill([seqs[0]], only_prompt=True)
                for seq in seqs:
                    self._finish(seq, "length")
                self._admitting.remove(req)
                continue
            if req.mm_inputs is not None:
                with_images.append(seqs)
            else:
                new.extend(seqs)
            room -= req.n
        if new:
            self._prefill(new)  # its merge also drops the rows that finished since the last step
        for seqs in with_images:
            self._prefill(seqs)
        if not new and not with_images:
            self._drop_finished(defer=False)
        self._admitting.clear()

    def _adapter_kwargs(self, seqs: list[_Seq]) -> dict[str, Any]:
        if not self.adapters:
            return {}
        return {"adapter_names": [s.req.adapter or BASE_ADAPTER for s in seqs]}

    def _prefill(self, seqs: list[_Seq], only_prompt: bool = False) -> None:
        if seqs[0].req.mm_inputs is not None:
            self._prefill_images(seqs, only_prompt)
            return
        longest = max(len(s.req.prompt_ids) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, seq in enumerate(seqs):
            prompt = seq.req.prompt_ids
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            mask[row, longest - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        want_prompt = any(s.req.prompt_logprobs and s.index == 0 for s in seqs)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=0 if want_prompt else 1, **self._adapter_kwargs(seqs))
        logits = out.logits.float()
        for row, seq in enumerate(seqs):
            if seq.req.prompt_logprobs and seq.index == 0:
                self._emit_prompt(seq, logits[row, longest - len(seq.req.prompt_ids):])
        if only_prompt:
            return
        last = logits[:, -1, :]
        for row, seq in enumerate(seqs):
            self._accept(seq, last[row])
        self._merge(seqs, out.past_key_values, mask)
        self._drop_finished()

    def _prefill_images(self, seqs: list[_Seq], only_prompt: bool) -> None:
        """Prefill the ``n`` rows ``seqs`` of one request with images: one forward of its prompt with the
        image inputs (the model computes its positions), the cache and last logits repeated per row."""
        req = seqs[0].req
        ids = torch.tensor([req.prompt_ids], dtype=torch.long)
        mask = torch.ones_like(ids)
        want_prompt = req.prompt_logprobs
        if self._rope_holder is not None:
            self._rope_holder.rope_deltas = None  # computed again for this prompt
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                         logits_to_keep=0 if want_prompt else 1, **req.mm_inputs, **self._adapter_kwargs(seqs[:1]))
        logits = out.logits.float()
        if want_prompt:
            self._emit_prompt(seqs[0], logits[0])
        if only_prompt:
            return
        deltas = getattr(self._rope_holder, "rope_deltas", None)
        delta = int(deltas.reshape(-1)[0]) if deltas is not None else 0
        n = len(seqs)
        cache = out.past_key_values
        if n > 1:
            layers = [(layer.keys.expand(n, -1, -1, -1).contiguous(), layer.values.expand(n, -1, -1, -1).contiguous())
                      for layer in cache.layers]
            cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        for seq in seqs:
            seq.rope_delta = delta
            self._accept(seq, logits[0, -1])
        self._merge(seqs, cache, mask.expand(n, -1).contiguous())
        self._drop_finished()

    def _emit_prompt(self, seq: _Seq, logits: torch.Tensor) -> None:
        """The prompt's tokens with the log-probability of each given the ones before (echo)."""
        prompt = seq.req.prompt_ids
        k = seq.req.sampling.top_logprobs
        lps = F.log_softmax(logits, dim=-1)
        tokens = [TokenInfo(prompt[0], self._piece(prompt[0]), None, [])]
        for pos in range(1, len(prompt)):
            row = lps[pos - 1]
            tokens.append(TokenInfo(prompt[pos], self._piece(prompt[pos]), float(row[prompt[pos]]), self._top(row, k)))
        seq.req.emit(Event("prompt", tokens=tokens, prompt_tokens=len(prompt)))

    def _merge(self, seqs: list[_Seq], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled sequences to the running batch, left-padding the shorter side;
        the rows that finished since the last step leave in the same copy of the cache (one copy
        of the running batch's cache per admission, instead of one to drop rows and two to merge)."""
        live = [i for i, s in enumerate(self._seqs) if s.pending is not None]
        if self._cache is None or not live:
            self._seqs, self._cache, self._mask = list(seqs), cache, mask
            return
        index = torch.tensor(live, dtype=torch.long) if len(live) != len(self._seqs) else None
        old_mask = self._mask if index is None else self._mask[index]
        first = _first_needed_column(old_mask)
        old_len, new_len = old_mask.shape[1] - first, mask.shape[1]
        width, rows = max(old_len, new_len), len(live)

        def joined(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            out = old.new_zeros((rows + new.shape[0], old.shape[1], width, old.shape[3]))
            out[:rows, :, width - old_len:] = old[:, :, first:] if index is None else old[index, :, first:]
            out[rows:, :, width - new_len:] = new
            return out

        layers = [(joined(old.keys, new.keys), joined(old.values, new.values))
                  for old, new in zip(self._cache.layers, cache.layers, strict=False)]
        self._mask = torch.cat([_left_pad(old_mask[:, first:], width, dim=1), _left_pad(mask, width, dim=1)])
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        self._seqs = [self._seqs[i] for i in live] + list(seqs)

    # ------------------------------------------------------------------ decode

    def _step(self) -> None:
        self._drop_finished(defer=False)  # rows that finished in a prefill while more were waiting
        seqs = self._seqs
        if not seqs:
            return
        ids = torch.tensor([[s.pending] for s in seqs], dtype=torch.long)
        positions = torch.tensor([[s.position + s.rope_delta] for s in seqs], dtype=torch.long)
        self._mask = torch.cat([self._mask, torch.ones((len(seqs), 1), dtype=torch.long)], dim=1)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=positions,
                         past_key_values=self._cache, use_cache=True, **self._adapter_kwargs(seqs))
        self._cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        for row, seq in enumerate(seqs):
            seq.position += 1
            self._accept(seq, logits[row])
        self._drop_finished()

    def _drop_finished(self, defer: bool = True) -> None:
        """Take the finished rows out of the batch; ``defer``: not now if requests are waiting and
        there is room for them (the next admission drops them in the copy it makes anyway)."""
        keep = [i for i, s in enumerate(self._seqs) if s.pending is not None]
        if len(keep) == len(self._seqs):
            return
        if defer and keep and len(keep) < self.max_num_seqs and not self._incoming.empty():
            return
        self._select(keep)

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` of the batch and trim the padding no row needs any more."""
        if not keep:
            self._reset_batch()
            return
        index = torch.tensor(keep, dtype=torch.long)
        mask = self._mask[index]
        first = _first_needed_column(mask)
        layers = [(layer.keys[index, :, first:], layer.values[index, :, first:]) for layer in self._cache.layers]
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        self._mask = mask[:, first:]
        self._seqs = [self._seqs[i] for i in keep]

    # ------------------------------------------------------------------ sampling and output

    def _accept(self, seq: _Seq, logits: torch.Tensor) -> None:
        """Sample the next token of ``seq`` from ``logits``, stream its text, finish it if due."""
        s = seq.req.sampling
        token = self._sample(seq, logits if seq.matcher is None else seq.matcher.mask(logits))
        if seq.matcher is not None:
            seq.matcher.accept(token)
        seq.generated.append(token)
        seq.req.completion_tokens += 1
        if seq.counts is not None:
            seq.counts[token] += 1
        if token in self.eos_ids and not s.ignore_eos:
            self._flush(seq, len(seq.text))
            self._finish(seq, "stop")
            return
        if s.logprobs:
            lps = F.log_softmax(logits, dim=-1)
            seq.unsent_tokens.append(TokenInfo(token, self._piece(token), float(lps[token]), self._top(lps, s.top_logprobs)))
        seq.text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        if self._check_stop(seq):
            return
        if len(seq.generated) >= s.max_tokens:
            self._flush(seq, len(seq.text))
            self._finish(seq, "length")
            return
        seq.pending = token
        self._flush(seq, _safe_end(seq.text, s.stop))

    def _sample(self, seq: _Seq, logits: torch.Tensor) -> int:
        s = seq.req.sampling
        if seq.counts is not None:
            logits = logits - s.presence_penalty * (seq.counts > 0).float() - s.frequency_penalty * seq.counts
        if s.temperature <= 0:
            return int(logits.argmax())
        logits = logits / s.temperature
        if 0 < s.top_k < logits.shape[-1]:
            kth = torch.topk(logits, s.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(-1)
            drop = cumulative - sorted_probs > s.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _check_stop(self, seq: _Seq) -> bool:
        for stop in seq.req.sampling.stop:
            at = seq.text.find(stop, max(0, seq.sent - len(stop)))
            if at >= 0:
                self._flush(seq, at)
                self._finish(seq, "stop")
                return True
        return False

    def _flush(self, seq: _Seq, end: int) -> None:
        if end > seq.sent or seq.unsent_tokens:
            text = seq.text[seq.sent:end] if end > seq.sent else ""
            seq.sent = max(seq.sent, end)
            seq.req.emit(Event("delta", index=seq.index, text=text, tokens=seq.unsent_tokens))
            seq.unsent_tokens = []

    def _finish(self, seq: _Seq, reason: str) -> None:
        seq.pending = None
        seq.req.emit(Event("delta", index=seq.index, tokens=seq.unsent_tokens, finish_reason=reason))
        seq.unsent_tokens = []
        seq.req.remaining -= 1
        if seq.req.remaining == 0:
            seq.req.emit(Event("done", prompt_tokens=len(seq.req.prompt_ids),
                               completion_tokens=seq.req.completion_tokens))

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _top(self, lps: torch.Tensor, k: int) -> list[tuple[str, float]]:
        if k <= 0:
            return []
        values, ids = lps.topk(k)
        return [(self._piece(int(i)), float(v)) for v, i in zip(values, ids, strict=True)]


def _first_needed_column(mask: torch.Tensor) -> int:
    """The first position any row of ``mask`` attends to: the left padding before it can go."""
    return int((mask.sum(0) > 0).nonzero()[0])


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=dim)


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be sent: not a trailing partial character, nor a possible stop prefix."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k:end] == stop[:k]:
                hold = max(hold, k)
                break
    return end - hold

