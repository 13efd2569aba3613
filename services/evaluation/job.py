"""The ``evaluate`` job kind: runs in the job's child process.

1. The target: a model version is deployed for the run through the inference service (a deployment named
   after the evaluation, so a retried attempt or the service's sweep finds it) and removed at the end —
   after success, failure or cancel; a deployment (or one of its adapters) is used as it is; an external
   OpenAI-compatible endpoint is called over HTTP.
2. Every benchmark's documents are loaded first (bundled data, the hub cache, or the custom set from the
   registry), so progress counts samples over the whole evaluation.
3. Samples are scored concurrently (``concurrency`` in flight): multiple choice through the inference
   service's ``Score`` RPC (all choices of a question against one shared context) or, for an endpoint,
   ``/v1/completions`` with echo + logprobs per choice as lm-evaluation-harness does; generation through
   Chat / Complete; code through the sandbox. A custom set whose rows carry images (an uploaded archive, or
   data: URLs) goes through chat only: each image is read from the extracted archive right before its
   request and sent as an image part (``ChatMessage.parts``; ``image_url`` data URLs to an endpoint), and
   its multiple-choice rows are answered by generation (see ``benchmarks.custom``).
4. Each benchmark's per-sample records go to the artifact store as JSON lines, its metrics (with standard
   errors) into the job's outputs; a retried attempt skips the benchmarks an earlier attempt finished.
5. At the end a JSON report is stored and, when the target is a registry version, the scores are
   recorded on it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import json
import math
import time
from collections.abc import Awaitable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from modelyard.client import FailedPrecondition as ClientFailedPrecondition
from modelyard.client import InferenceClient, NotFound, RegistryClient
from modelyard.inference.v1 import inference_pb2 as ipb
from services.core.artifacts import S3ArtifactStore
from services.core.datasets import iter_rows
from services.core.errors import (
    DomainError,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    Unavailable,
    error_dict,
)
from services.core.image_datasets import (
    ImageError,
    ImagePolicy,
    data_dir_for,
    decode_image,
    extract_archive,
    is_archive,
    read_image_bytes,
    sniff_mime,
)
from services.core.jobs.context import JobContext
from services.core.jobs.secrets import s3_settings_for

from . import benchmarks as bm
from .domain import temporary_deployment_id
from .sandbox import run_program

PROGRESS_INTERVAL_S = 1.0
ENGINES = {"vllm": ipb.ENGINE_VLLM, "transformers": ipb.ENGINE_TRANSFORMERS}
ROLES = {
    "system": ipb.CHAT_ROLE_SYSTEM,
    "user": ipb.CHAT_ROLE_USER,
    "assistant": ipb.CHAT_ROLE_ASSISTANT,
}
MAX_STOP = 4  # OpenAI accepts at most 4 stop sequences; the rest are cut after generation


def run_evaluation(ctx: JobContext) -> dict[str, Any]:
    return asyncio.run(_Evaluation(ctx).run())


class Scorer(Protocol):
    async def loglikelihoods(self, req: bm.MCRequest) -> bm.MCResult: ...
    async def generate(self, req: bm.GenRequest, generation: dict[str, Any]) -> bm.GenResult: ...
    async def close(self) -> None: ...


def _truncate(text: str, until: list[str]) -> str:
    """The text up to the first stop sequence (lm-eval cuts the same way after generation)."""
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def _chat_message(m: dict[str, Any]) -> ipb.ChatMessage:
    """One message for the inference service: text content, or ordered parts (resolved images and text)."""
    content = m["content"]
    if isinstance(content, str):
        return ipb.ChatMessage(role=ROLES[m["role"]], content=content)
    parts = [
        ipb.ContentPart(image=ipb.ImageInput(data=p["data"], mime_type=p["mime_type"]))
        if p["type"] == "image"
        else ipb.ContentPart(text=p["text"])
        for p in content
    ]
    return ipb.ChatMessage(role=ROLES[m["role"]], parts=parts)


def _openai_message(m: dict[str, Any]) -> dict[str, Any]:
    """One message for an OpenAI-compatible endpoint: resolved images become ``image_url`` data URLs."""
    content = m["content"]
    if isinstance(content, str):
        return m
    parts = [
        {"type": "image_url",
         "image_url": {"url": f"data:{p['mime_type']};base64,{base64.b64encode(p['data']).decode()}"}}
        if p["type"] == "image"
        else {"type": "text", "text": p["text"]}
        for p in content
    ]  # fmt: skip
    return {"role": m["role"], "content": parts}


def _sampling(req: bm.GenRequest, generation: dict[str, Any]) -> dict[str, Any]:
    """Decoding of one request: the benchmark's limits, overridden by the evaluation's settings."""
    return {
        "max_tokens": generation.get("max_tokens") or req.max_tokens,
        "temperature": generation.get("temperature", req.temperature),
        "top_p": generation.get("top_p"),
        "top_k": generation.get("top_k"),
        "seed": generation.get("seed"),
        "stop": [*req.until, *generation.get("stop", [])],
        "n": req.n,
    }


class DeploymentScorer:
    """Scores through the inference service: ``Score`` for choices, Chat / Complete for generation."""

    def __init__(self, inference: InferenceClient, deployment: str, adapter: str) -> None:
        self.inference = inference
        self.deployment = deployment
        self.adapter = adapter

    async def loglikelihoods(self, req: bm.MCRequest) -> bm.MCResult:
        kwargs: dict[str, Any] = {}
        if req.messages:
            kwargs["context_messages"] = [
                ipb.ChatMessage(role=ROLES[m["role"]], content=m["content"]) for m in req.messages
            ]
        else:
            kwargs["context"] = req.context
        result = await self.inference.score(
            self.deployment, continuations=list(req.continuations), adapter=self.adapter, timeout=600, **kwargs
        )
        return bm.MCResult(
            loglikelihoods=[s.logprob for s in result.scores], is_greedy=[s.is_greedy for s in result.scores]
        )

    async def generate(self, req: bm.GenRequest, generation: dict[str, Any]) -> bm.GenResult:
        s = _sampling(req, generation)
        sampling = ipb.SamplingParams(
            max_tokens=s["max_tokens"],
            temperature=s["temperature"],
            top_p=s["top_p"],
            top_k=s["top_k"],
            seed=s["seed"],
            stop=s["stop"][:MAX_STOP],
            n=s["n"],
        )
        texts: dict[int, list[str]] = {}
        if req.messages:
            messages = [_chat_message(m) for m in req.messages]
            stream: Any = self.inference.chat(
                deployment=self.deployment, messages=messages, adapter=self.adapter, sampling=sampling, timeout=900
            )
            async for chunk in stream:
                for c in chunk.choices:
                    texts.setdefault(c.index, []).append(c.content)
        else:
            stream = self.inference.complete(
                deployment=self.deployment, prompt=req.prompt, adapter=self.adapter, sampling=sampling, timeout=900
            )
            async for chunk in stream:
                for c in chunk.choices:
                    texts.setdefault(c.index, []).append(c.text)
        out = ["".join(texts.get(i, [])) for i in range(req.n)]
        return bm.GenResult(texts=[_truncate(t, s["stop"]) for t in out])

    async def close(self) -> None:
        return None


class EndpointScorer:
    """Scores against an external OpenAI-compatible endpoint over HTTP (the way lm-eval's API models do)."""

    def __init__(self, base_url: str, model: str, api_key: str) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=600)

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = await self.client.post(path, json={"model": self.model, **body})
        except httpx.HTTPError as exc:
            raise Unavailable(f"endpoint {self.client.base_url}{path}: {exc}", reason="ENDPOINT_UNREACHABLE") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - a non-OpenAI error body: show its start
                message = r.text[:300]
            cls = InvalidArgument if r.status_code in (400, 404, 422) else Unavailable
            raise cls(
                f"endpoint {self.client.base_url}{path} answered {r.status_code}: {message}", reason="ENDPOINT_ERROR"
            )
        return r.json()

    async def loglikelihoods(self, req: bm.MCRequest) -> bm.MCResult:
        if req.messages:
            raise FailedPrecondition(
                "multiple choice with the chat template needs a deployment (an endpoint scores plain text prompts)",
                reason="CHAT_TEMPLATE_UNSUPPORTED",
            )
        results = await asyncio.gather(*(self._one(req.context, c) for c in req.continuations))
        return bm.MCResult(loglikelihoods=[r[0] for r in results], is_greedy=[r[1] for r in results])

    async def _one(self, context: str, continuation: str) -> tuple[float, bool]:
        prompt = context + continuation
        body = await self._post(
            "completions",
            {"prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0.0},
        )
        lp = (body.get("choices") or [{}])[0].get("logprobs") or {}
        offsets, values, tops = lp.get("text_offset"), lp.get("token_logprobs"), lp.get("top_logprobs")
        tokens = lp.get("tokens")
        if not offsets or values is None or tokens is None:
            raise FailedPrecondition(
                "the endpoint returned no prompt log-probabilities (completions with echo and logprobs are needed "
                "for multiple choice)",
                reason="NO_PROMPT_LOGPROBS",
            )
        total, greedy = 0.0, True
        for i, (offset, value) in enumerate(zip(offsets, values, strict=False)):
            if offset < len(context) or offset >= len(prompt) or value is None:
                continue
            total += float(value)
            top = (tops or [None] * len(values))[i]
            if top:
                best = max(top.items(), key=lambda kv: kv[1])[0]
                greedy = greedy and best == tokens[i]
        return total, greedy

    async def generate(self, req: bm.GenRequest, generation: dict[str, Any]) -> bm.GenResult:
        s = _sampling(req, generation)
        body: dict[str, Any] = {k: v for k, v in s.items() if v is not None and k not in ("stop", "n")}
        body["stop"] = s["stop"][:MAX_STOP]
        if s["n"] > 1:
            body["n"] = s["n"]
        if req.messages:
            messages = [_openai_message(m) for m in req.messages]
            out = await self._post("chat/completions", {"messages": messages, **body})
            texts = [c["message"].get("content") or "" for c in sorted(out["choices"], key=lambda c: c["index"])]
        else:
            out = await self._post("completions", {"prompt": req.prompt, **body})
            texts = [c.get("text") or "" for c in sorted(out["choices"], key=lambda c: c["index"])]
        return bm.GenResult(texts=[_truncate(t, s["stop"]) for t in texts])

    async def close(self) -> None:
        await self.client.aclose()


class _Progress:
    """Samples done over the whole evaluation -> job progress (fraction, step, ETA) and samples/s, at most
    once a second."""

    def __init__(self, ctx: JobContext, total: int, done: int) -> None:
        self.ctx, self.total, self.done = ctx, total, done
        self.started, self.start_done, self.last = time.monotonic(), done, 0.0

    def add(self, n: int = 1, *, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        rate = (self.done - self.start_done) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else None
        self.ctx.progress(
            fraction=min(1.0, self.done / self.total) if self.total else 1.0,
            step=self.done,
            total_steps=self.total,
            eta_s=eta,
        )
        self.ctx.metrics(step=self.done, samples_per_s=rate)


class _Evaluation:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.spec = ctx.spec
        self.jid = ctx.name.split("/")[-1]
        self.store = S3ArtifactStore.connect(s3_settings_for(self.spec["s3"]))
        self.workdir = Path(ctx.workdir)
        self.outputs: dict[str, Any] = {}

    # ------------------------------------------------------------------ the run

    async def run(self) -> dict[str, Any]:
        spec, ctx = self.spec, self.ctx
        ctx.progress(fraction=0.0)
        previous = (ctx.resume_state() or {}).get("results", {})
        planned = [self._plan(run) for run in spec["benchmarks"]]
        total = sum(len(p["docs"]) for p in planned)
        done_before = sum(len(p["docs"]) for p in planned if p["run"]["name"] in previous)
        ctx.log("benchmarks loaded", samples=total, benchmarks=[p["run"]["name"] for p in planned])
        inference = InferenceClient(spec["inference_addr"], timeout=120)
        temporary = ""
        scorer: Scorer | None = None
        try:
            scorer, temporary = await self._open_target(inference)
            progress = _Progress(ctx, total, done_before)
            results: list[dict[str, Any]] = []
            for plan in planned:
                name = plan["run"]["name"]
                if name in previous:
                    results.append(previous[name])
                    continue
                if ctx.cancelled():
                    break
                result = await self._benchmark(scorer, plan, progress)
                results.append(result)
                if not result.get("error"):
                    previous[name] = result
                self.outputs["results"] = results
                ctx.set_outputs(self.outputs)
                ctx.save_resume_state({"results": previous})
            progress.add(0, force=True)
            if ctx.cancelled():
                ctx.log("cancelled: the benchmarks finished so far are kept")
                return self.outputs
            if results and all(r.get("error") for r in results):
                first = results[0]["error"]
                raise FailedPrecondition(
                    f"every benchmark failed; first: {first['message']}", reason="ALL_BENCHMARKS_FAILED"
                )
            self._report(results)
            await self._record_scores(results)
            return self.outputs
        finally:
            if scorer is not None:
                await scorer.close()
            if temporary:
                await self._remove_deployment(inference, temporary)
            await inference.close()

    # ------------------------------------------------------------------ loading

    def _plan(self, run: dict[str, Any]) -> dict[str, Any]:
        """Load one benchmark's documents and build every request, in document order (few-shot sampling follows
        lm-eval's single random stream, so the order matters)."""
        spec = self.spec
        k = run.get("num_fewshot")
        if k is None:
            k = spec.get("num_fewshot")
        options = dict(run.get("options") or {})
        if k is not None:
            options["num_fewshot"] = str(k)
        images: ImagePolicy | None = None
        if run.get("dataset"):
            bench, images = self._custom(run, options)
        else:
            sandbox = spec.get("sandbox") or {}
            if bm.resolve(run["name"], {}, field="benchmark").info.kind == "code":
                options.setdefault("timeout_s", str(sandbox.get("timeout_s", 10.0)))
            bench = bm.resolve(run["name"], options, field="benchmark")
            if bench.info.kind == "code":
                bench.run_program = functools.partial(  # type: ignore[attr-defined]
                    run_program,
                    memory_bytes=int(sandbox.get("memory_bytes", 1 << 30)),
                    allow_degraded=bool(sandbox.get("allow_degraded")),
                )
        data = spec.get("data") or {}
        source = bm.DataSource(
            cache_dir=Path(data.get("cache_dir") or (self.workdir / "cache")),
            hf_endpoint=data.get("hf_endpoint") or "https://huggingface.co",
            hf_token=_hf_token(),
            modelscope_endpoint=data.get("modelscope_endpoint") or "https://modelscope.cn",
            hub=data.get("hub") or "auto",
        )
        docs = bench.load(source)
        limit = run.get("limit") or spec.get("limit") or 0
        test = docs.test[:limit] if limit else docs.test
        k = bench.num_fewshot
        chat = bool(spec.get("apply_chat_template"))
        requests = []
        for i, doc in enumerate(test):
            fewshot = bench.fewshot_examples(docs, doc, k) if k else []
            requests.append(bench.build(doc, i, fewshot, chat=chat))
        if images is not None:
            check_images(run["dataset"]["name"], test, images)
        return {"run": run, "bench": bench, "docs": test, "requests": requests, "k": k, "images": images}

    def _custom(self, run: dict[str, Any], options: dict[str, str]) -> tuple[Any, ImagePolicy | None]:
        """The custom set's benchmark and, when its rows carry images, where they are read from (an archive is
        extracted next to it; a plain file may only hold data: URLs)."""
        d = run["dataset"]
        stem = d["name"].replace("/", "_")
        filename = d["key"].rsplit("/", 1)[-1]
        path = self.workdir / "datasets" / (f"{stem}-{filename}" if is_archive(filename) else stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.store.get_file(d["key"], path)
        data, base_dir = path, None
        if is_archive(filename):
            try:
                data = extract_archive(path, self.workdir / "datasets" / f"{stem}-files")
            except ImageError as err:
                raise InvalidArgument(f"{d['name']}: {err}", reason="EVAL_SET_ARCHIVE_INVALID") from None
            base_dir = data_dir_for(data)
        bench, issues = bm.custom_benchmark(iter_rows(data), name=run["name"], field="dataset_version")
        if options.get("num_fewshot"):
            bench.num_fewshot = int(options["num_fewshot"])
        if issues:
            raise InvalidArgument(
                f"{d['name']}: {len(issues)} invalid rows; first: {issues[0]}", reason="INVALID_EVALUATION_SET"
            )
        if not getattr(bench, "with_images", False):  # custom sets only
            return bench, None
        if self.spec["target"].get("vision") is False:  # preflight did not know the set had images
            raise FailedPrecondition(
                f"{d['name']}: the rows carry images, but {self.spec['target'].get('model_version') or 'the target'} "
                "is a text-only model",
                reason="MODEL_NOT_VISION",
            )
        return bench, ImagePolicy(base_dir=base_dir)

    # ------------------------------------------------------------------ target

    async def _open_target(self, inference: InferenceClient) -> tuple[Scorer, str]:
        t = self.spec["target"]
        if t["kind"] == "endpoint":
            return EndpointScorer(t["base_url"], t["model"], t.get("api_key", "")), ""
        if t["kind"] == "deployment":
            self.outputs.update(deployment=t["deployment"], model_version=t.get("model_version", ""))
            self.ctx.set_outputs(self.outputs)
            return DeploymentScorer(inference, t["deployment"], t.get("adapter", "")), ""
        name = f"deployments/{temporary_deployment_id(self.ctx.name)}"
        self.outputs.update(deployment=name, temporary_deployment=True, model_version=t["model_version"])
        self.ctx.set_outputs(self.outputs)  # stored before the deploy: the sweep finds it even if this child dies
        adapter = await self._deploy(inference, name, t)
        return DeploymentScorer(inference, name, adapter), name

    async def _deploy(self, inference: InferenceClient, name: str, t: dict[str, Any]) -> str:
        """Deploy the version (an adapter on its base) and wait until it is READY; the adapter alias."""
        try:
            old = await inference.get_deployment(name)
        except NotFound:
            old = None
        if old is not None:  # left by an earlier attempt: start clean
            self.ctx.log("removing the deployment an earlier attempt left", deployment=name)
            await self._remove_deployment(inference, name)
        adapter = "candidate" if t.get("adapter_of") else ""  # not "eval": peft names a module attribute after it
        base = t.get("adapter_of") or t["model_version"]
        engines = ["vllm", "transformers"] if t.get("engine", "auto") == "auto" else [t["engine"]]
        for i, engine in enumerate(engines):
            deployment = ipb.Deployment(
                model_version=base,
                engine=ENGINES[engine],
                options=ipb.EngineOptions(**(self.spec.get("deploy_options") or {})),
            )
            if adapter:
                deployment.adapters.append(ipb.Adapter(alias=adapter, model_version=t["model_version"]))
            try:
                await inference.deploy(deployment, deployment_id=name.split("/")[1], timeout=120)
            except ClientFailedPrecondition as err:
                if i + 1 < len(engines):
                    self.ctx.log("engine unavailable, trying the next", engine=engine, error=err.message)
                    continue
                raise
            self.ctx.log("temporary deployment created", deployment=name, engine=engine, model_version=base)
            break
        deadline = time.monotonic() + float(self.spec.get("deploy_timeout_s", 900))
        while True:
            dep = await inference.get_deployment(name)
            if dep.state == ipb.DEPLOYMENT_STATE_READY:
                self.ctx.log("temporary deployment ready", deployment=name)
                return adapter
            if dep.state == ipb.DEPLOYMENT_STATE_FAILED:
                raise FailedPrecondition(
                    f"the temporary deployment {name} failed: {dep.error.message}", reason="DEPLOYMENT_FAILED"
                )
            if time.monotonic() > deadline:
                raise Unavailable(f"the temporary deployment {name} was not READY in time", reason="DEPLOY_TIMEOUT")
            if self.ctx.cancelled():
                raise FailedPrecondition("cancelled while deploying", reason="CANCELLED")
            await asyncio.sleep(1.0)

    async def _remove_deployment(self, inference: InferenceClient, name: str) -> None:
        """Undeploy and wait until it is gone (errors are logged: the service's sweep retries)."""
        try:
            await inference.undeploy(name, timeout=60)
            for _ in range(120):
                await inference.get_deployment(name)
                await asyncio.sleep(0.5)
        except NotFound:
            self.ctx.log("temporary deployment removed", deployment=name)
            self.outputs["temporary_deployment_removed"] = True
            self.ctx.set_outputs(self.outputs)
            return
        except Exception as exc:  # noqa: BLE001 - logged; the service's sweep removes it later
            self.ctx.log("temporary deployment not removed yet", deployment=name, error=str(exc))

    # ------------------------------------------------------------------ scoring

    async def _benchmark(self, scorer: Scorer, plan: dict[str, Any], progress: _Progress) -> dict[str, Any]:
        run, bench, docs, k = plan["run"], plan["bench"], plan["docs"], plan["k"]
        name = run["name"]
        generation = self.spec.get("generation") or {}
        concurrency = max(1, int(self.spec.get("concurrency") or 8))
        self.ctx.log("benchmark started", benchmark=name, samples=len(docs), num_fewshot=k)
        started = time.monotonic()
        scores: list[Any] = [None] * len(docs)
        sem = asyncio.Semaphore(concurrency)
        code = bench.info.kind == "code"

        async def one(i: int, doc: dict[str, Any]) -> None:
            async with sem:
                if self.ctx.cancelled():
                    return
                req = plan["requests"][i]
                sent = None
                if isinstance(req, bm.GenRequest) and req.images:
                    sent = await asyncio.to_thread(_with_image_data, req, plan["images"], doc)
                if isinstance(req, bm.MCRequest):
                    result: Any = await scorer.loglikelihoods(req)
                else:
                    result = await scorer.generate(sent or req, generation)
                if code:
                    scores[i] = await asyncio.to_thread(bench.score, doc, req, result)
                else:
                    scores[i] = bench.score(doc, req, result)
                if sent is not None:  # the image parts that went out with bytes, as a check on the plan
                    scores[i].extra["images_sent"] = _image_parts(sent)
                progress.add()

        try:
            await _gather_cancelling([one(i, d) for i, d in enumerate(docs)])
        except DomainError as err:
            self.ctx.log("benchmark failed", benchmark=name, error=err.message)
            return {"benchmark": name, "error": error_dict(err), "num_samples": 0}
        except Exception as err:  # noqa: BLE001 - this benchmark fails with its reason; the others go on
            self.ctx.log("benchmark failed", benchmark=name, error=repr(err))
            return {"benchmark": name, "error": error_dict(Internal(f"{name}: {err!r}")), "num_samples": 0}
        finished = [s for s in scores if s is not None]
        elapsed = time.monotonic() - started
        metrics = bm.aggregate(bench.info, finished) if finished else {}
        key = f"evaluations/{self.jid}/samples/{_slug(name)}.jsonl"
        lines = [json.dumps(_record(s), default=str) for s in finished]
        self.store.put_bytes(key, ("\n".join(lines) + "\n").encode(), "application/x-ndjson")
        result = {
            "benchmark": name,
            **({"num_images": sum(len(r.images) for r in plan["requests"])} if plan["images"] else {}),
            "metrics": {m: v for m, (v, _) in metrics.items()},
            "stderr": {m: e for m, (_, e) in metrics.items() if e is not None and not math.isnan(e)},
            "primary_metric": bench.info.metrics[0] if bench.info.metrics else "",
            "num_samples": len(finished),
            "num_fewshot": k,
            "predictions_artifact_key": key,
            "duration_s": elapsed,
            "samples_per_second": len(finished) / elapsed if elapsed > 0 else 0.0,
        }
        self.ctx.log(
            "benchmark finished",
            benchmark=name,
            samples=len(finished),
            seconds=round(elapsed, 2),
            **{m: round(v, 4) for m, v in result["metrics"].items()},
        )
        return result

    # ------------------------------------------------------------------ results

    def _report(self, results: list[dict[str, Any]]) -> None:
        key = f"evaluations/{self.jid}/report.json"
        report = {
            "evaluation": self.ctx.name,
            "target": {k: v for k, v in self.spec["target"].items() if k != "api_key"},
            "results": results,
        }
        self.store.put_bytes(key, json.dumps(report, indent=2, default=str).encode(), "application/json")
        self.outputs["report_artifact_key"] = key
        self.outputs["results"] = results

    async def _record_scores(self, results: list[dict[str, Any]]) -> None:
        version = self.outputs.get("model_version") or ""
        if not version:
            return
        scores = [
            {
                "benchmark": f"benchmarks/{r['benchmark']}",
                "metric": metric,
                "value": value,
                "stderr": r.get("stderr", {}).get(metric, 0.0),
                "num_samples": r["num_samples"],
            }
            for r in results
            if not r.get("error")
            for metric, value in r["metrics"].items()
            if value is not None and not math.isnan(value)
        ]
        registry = RegistryClient(self.spec["registry_addr"], timeout=60)
        try:
            await registry.record_evaluation_scores(version, self.ctx.name, scores)
            self.ctx.log("scores recorded on the model version", model_version=version, scores=len(scores))
        except NotFound:
            self.ctx.log("the model version is gone: scores not recorded", model_version=version)
        finally:
            await registry.close()


def check_images(dataset: str, docs: list[dict[str, Any]], policy: ImagePolicy) -> None:
    """Every image of the rows to run is there and decodes, before any request: a bad one fails the
    evaluation naming its row (the registry's upload validation should have caught it already)."""
    issues: list[tuple[str, str]] = []
    for doc in docs:
        for j, ref in enumerate(doc.get("images", [])):
            try:
                decode_image(read_image_bytes(ref, policy))
            except ImageError as err:
                issues.append((f"dataset_version[row {doc['row']}].images[{j}]", f"{ref[:80]!r}: {err}"))
    if issues:
        first = issues[0]
        raise InvalidArgument(
            f"{dataset}: {len(issues)} image(s) cannot be loaded; first: {first[0]}: {first[1]}",
            reason="EVAL_SET_IMAGE_INVALID",
            violations=[FieldViolation(f, why) for f, why in issues[:20]],
        )


def _with_image_data(req: bm.GenRequest, policy: ImagePolicy | None, doc: dict[str, Any]) -> bm.GenRequest:
    """``req`` with each image part's reference replaced by the image's bytes and media type (read now, so
    only the requests in flight hold image bytes)."""
    if policy is None:
        policy = ImagePolicy()

    def part(p: dict[str, Any]) -> dict[str, Any]:
        if p.get("type") != "image":
            return p
        try:
            data = read_image_bytes(p["image"], policy)
        except ImageError as err:
            raise InvalidArgument(
                f"row {doc.get('row')}: image {p['image'][:80]!r}: {err}", reason="EVAL_SET_IMAGE_INVALID"
            ) from None
        return {"type": "image", "data": data, "mime_type": sniff_mime(data) or "application/octet-stream"}

    messages = [
        m if isinstance(m["content"], str) else {**m, "content": [part(p) for p in m["content"]]}
        for m in req.messages or []
    ]
    return dataclasses.replace(req, messages=messages)


def _image_parts(req: bm.GenRequest) -> int:
    return sum(
        1
        for m in req.messages or []
        if not isinstance(m["content"], str)
        for p in m["content"]
        if p.get("type") == "image" and p.get("data")
    )


async def _gather_cancelling(coros: list[Awaitable[None]]) -> None:
    """Run all; the first error cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _record(score: Any) -> dict[str, Any]:
    d = asdict(score) if is_dataclass(score) and not isinstance(score, type) else dict(score)
    return {
        "doc_id": d.get("doc_id"),
        "prompt": d.get("prompt", ""),
        "prediction": d.get("prediction", ""),
        "reference": d.get("reference", ""),
        "metrics": d.get("metrics", {}),
        **({"extra": d["extra"]} if d.get("extra") else {}),
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _hf_token() -> str | None:
    import os

    return os.environ.get("YARD_JOB_HF_TOKEN") or None


__all__ = ["run_evaluation"]
