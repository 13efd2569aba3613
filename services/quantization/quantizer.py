"""The quantizer process: ``<.venv-quant>/bin/python -m services.quantization.quantizer CONFIG.json EVENT_FD``.

Runs in the quantizers' own virtualenv (llm-compressor, GPTQModel and AutoAWQ pin a transformers that
``.venv`` does not have), so it imports nothing of ModelYard beyond this file. The job (``job.py``)
writes CONFIG.json and reads one JSON object per line on EVENT_FD: ``{"t": "log"|"progress"|"result", ...}``.
A refusal is ``{"t": "error", "reason": ..., "message": ...}`` then exit 2; a crash exits 1 with its traceback
on stderr.

Steps: load the source in its dtype -> score it on the held-out text (perplexity and its top-1 next
tokens) -> quantize with the chosen library -> save -> load the saved checkpoint back (the reload is the
load check) -> score it against the source's top-1 tokens -> one greedy generation.
The layer rule matches ``methods.py``: lm_head and any Linear whose input size the group size does not
divide stay unquantized, and are reported.
"""

from __future__ import annotations

import gc
import importlib.metadata as md
import json
import math
import os
import re
import resource
import sys
import time
import traceback
from collections.abc import Sized
from pathlib import Path
from typing import Any

# The libraries a backend's checkpoint depends on (recorded on the version).
LIBRARIES = {
    "llm_compressor": ("torch", "transformers", "llmcompressor", "compressed-tensors"),
    "gptqmodel": ("torch", "transformers", "gptqmodel"),
    "autoawq": ("torch", "transformers", "autoawq"),
    "bitsandbytes": ("torch", "transformers", "bitsandbytes"),
}


class Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Events:
    def __init__(self, fd: int) -> None:
        self._stream = os.fdopen(fd, "w", encoding="utf-8")

    def send(self, kind: str, **fields: Any) -> None:
        self._stream.write(json.dumps({"t": kind, **fields}, default=str) + "\n")
        self._stream.flush()

    def log(self, message: str, **fields: Any) -> None:
        self.send("log", message=message, data=fields)

    def progress(self, fraction: float, phase: str) -> None:
        self.send("progress", fraction=round(fraction, 4), phase=phase)


def library_versions(backend: str) -> dict[str, str]:
    found = {}
    for name in LIBRARIES[backend]:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- layer progress

_LAYER_DESC = re.compile(r"^\((\d+)/(\d+)\)")  # llm-compressor's sequential pipeline: "(k/N): Calibrating"


def report_layer_progress(events: Events, lo: float, hi: float) -> None:
    """Turn the quantizers' own progress bars into job progress between ``lo`` and ``hi``: llm-compressor's
    per-layer subgraphs ("(k/N): Calibrating") and AutoAWQ's layer loop ("AWQ"). The bars themselves are
    silenced (the job log is not a terminal)."""
    import tqdm.std as std

    original_init, original_iter = std.tqdm.__init__, std.tqdm.__iter__
    state = {"sent": -1.0}

    def send(done: int, total: int, phase: str) -> None:
        fraction = lo + (hi - lo) * min(1.0, done / total)
        if fraction - state["sent"] >= 0.01:
            state["sent"] = fraction
            events.progress(fraction, phase)

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        desc = kwargs.get("desc") or (args[1] if len(args) > 1 and isinstance(args[1], str) else "") or ""
        iterable = args[0] if args else kwargs.get("iterable")
        total = kwargs.get("total") or (len(iterable) if isinstance(iterable, Sized) else 0)
        kwargs["disable"] = True
        original_init(self, *args, **kwargs)
        self._yard_bar = (desc, total)
        m = _LAYER_DESC.match(desc)
        if m and "Calibrating" in desc:
            send(int(m.group(1)) - 1, int(m.group(2)), f"quantizing layer {m.group(1)} of {m.group(2)}")

    def iterate(self: Any) -> Any:
        desc, total = getattr(self, "_yard_bar", ("", 0))
        for i, item in enumerate(original_iter(self)):
            if desc == "AWQ" and total:
                send(i, total, f"quantizing layer {i + 1} of {total}")
            yield item

    setattr(std.tqdm, "__init__", init)  # noqa: B010 - patching the class the libraries already imported
    setattr(std.tqdm, "__iter__", iterate)  # noqa: B010


# ----------------------------------------------------------------------------- data


def read_texts(path: str | None) -> list[str]:
    if not path:
        return []
    return [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_chunks(tokenizer: Any, text: str, seq_len: int, max_tokens: int) -> list[list[int]]:
    """The held-out text as consecutive windows of ``seq_len`` tokens, ``max_tokens`` in all."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) > 1]


def score(
    model: Any, chunks: list[list[int]], reference: list[list[int]] | None = None
) -> tuple[float, list[list[int]], float | None, int]:
    """Perplexity over the chunks, the model's top-1 next token at each position, and the fraction of
    positions where it equals ``reference`` (the source's top-1)."""
    import torch

    nll, count, agree = 0.0, 0, 0
    tops: list[list[int]] = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for i, chunk in enumerate(chunks):
            ids = torch.tensor([chunk], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = ids[0, 1:]
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += target.numel()
            top = logits.argmax(-1).tolist()
            tops.append(top)
            if reference is not None:
                agree += sum(int(a == b) for a, b in zip(top, reference[i], strict=True))
    ppl = math.exp(nll / max(1, count))
    return ppl, tops, (agree / max(1, count) if reference is not None else None), count


def generate(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 16) -> str:
    import torch

    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = messages[-1]["content"]
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    new = out[0, ids["input_ids"].shape[1] :]
    if new.numel() == 0:
        raise Refused("GENERATION_EMPTY", "the quantized model generated no token")
    return tokenizer.decode(new, skip_special_tokens=True)


# ----------------------------------------------------------------------------- layers


def skipped_linears(model: Any, group_size: int) -> list[str]:
    """Linear modules left unquantized: lm_head, and those whose input size ``group_size`` does not divide."""
    import torch

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.endswith("lm_head") or (group_size > 0 and module.in_features % group_size):
            names.append(name)
    return names


def quantizable(model: Any, skipped: list[str]) -> int:
    import torch

    return sum(1 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in skipped)


# ----------------------------------------------------------------------------- backends


def _calibration(tokenizer: Any, texts: list[str], samples: int, max_length: int) -> list[dict[str, list[int]]]:
    rows = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=False)
        if len(enc["input_ids"]) >= 2:
            rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        if len(rows) == samples:
            break
    if not rows:
        raise Refused("CALIBRATION_EMPTY", "no calibration sample has 2 or more tokens")
    return rows


def _llmc_scheme(cfg: dict[str, Any]) -> dict[str, Any]:
    """compressed-tensors config_groups for the method (the presets, with our group size)."""
    method, bits, group = cfg["method"], cfg["bits"], cfg["group_size"]
    weights: dict[str, Any] = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False}
    if group > 0:
        weights.update(strategy="group", group_size=group)
    else:
        weights.update(strategy="channel")
    group_cfg: dict[str, Any] = {"targets": ["Linear"], "weights": weights}
    if method == "awq":
        weights["symmetric"] = False
    elif method == "w8a8":
        group_cfg["input_activations"] = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "dynamic": True,
            "strategy": "token",
        }
    elif method == "fp8":
        weights.update(type="float", strategy="channel")
        weights.pop("group_size", None)
        group_cfg["input_activations"] = {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "dynamic": True,
            "strategy": "token",
        }
    return {"group_0": group_cfg}


def quantize_llm_compressor(
    model: Any, tokenizer: Any, cfg: dict[str, Any], texts: list[str], skipped: list[str], events: Events
) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    method = cfg["method"]
    groups = _llmc_scheme(cfg)
    if method in ("int8", "fp8"):
        recipe: list[Any] = [QuantizationModifier(config_groups=groups, ignore=skipped)]
        oneshot(model=model, recipe=recipe)
        return
    from datasets import Dataset

    rows = _calibration(tokenizer, texts, cfg["samples"], cfg["max_length"])
    events.log("calibration tokenized", samples=len(rows), tokens=sum(len(r["input_ids"]) for r in rows))
    dataset = Dataset.from_list(rows)
    if method == "awq":
        from llmcompressor.modifiers.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not _cuda():  # llm-compressor 0.14 pins calibration activations without an accelerator: skip it on CPU
            IntermediatesCache.pin_memory = lambda *a, **k: None
        recipe = [AWQModifier(config_groups=groups, ignore=skipped)]
    elif method == "w8a8":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        recipe = [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(config_groups=groups, ignore=skipped)]
    else:  # gptq
        recipe = [GPTQModifier(config_groups=groups, ignore=skipped)]
    oneshot(
        model=model, dataset=dataset, recipe=recipe, max_seq_length=cfg["max_length"], num_calibration_samples=len(rows)
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_llm_compressor(
    cfg: dict[str, Any],
    texts: list[str],
    events: Events,
    src: Path,
    out: Path,
    model: Any,
    tokenizer: Any,
    skipped: list[str],
) -> None:
    quantize_llm_compressor(model, tokenizer, cfg, texts, skipped, events)
    events.progress(0.75, "saving")
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


def run_gptqmodel(
    cfg: dict[str, Any], texts: list[str], events: Events, src: Path, out: Path, tokenizer: Any, skipped: list[str]
) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, int(os.environ.get("OMP_NUM_THREADS", "1")))))
    from gptqmodel import GPTQModel, QuantizeConfig

    rows = _calibration(tokenizer, texts, cfg["samples"], cfg["max_length"])
    events.log("calibration tokenized", samples=len(rows), tokens=sum(len(r["input_ids"]) for r in rows))
    dynamic: dict[str, dict[str, Any]] = {
        f"-:^{name.replace('.', '[.]')}$": {} for name in skipped if not name.endswith("lm_head")
    }
    qcfg = QuantizeConfig(bits=cfg["bits"], group_size=cfg["group_size"], dynamic=dynamic or None)
    model = GPTQModel.load(str(src), qcfg)
    model.quantize(rows, batch_size=1)
    events.progress(0.75, "saving")
    model.save(str(out))
    tokenizer.save_pretrained(out)
    for extra in ("quant_log.csv",):
        (out / extra).unlink(missing_ok=True)


def run_autoawq(
    cfg: dict[str, Any], texts: list[str], events: Events, src: Path, out: Path, tokenizer: Any, skipped: list[str]
) -> None:
    from awq import AutoAWQForCausalLM

    model = AutoAWQForCausalLM.from_pretrained(str(src))
    # AutoAWQ drops samples longer than max_calib_seq_len (re-tokenized) and needs max_calib_seq_len tokens in
    # all: each text is cut to a window a little shorter than the limit.
    window = max(8, cfg["max_length"] - 16)
    samples = []
    for text in texts[: cfg["samples"]]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:window]
        if len(ids) >= 2:
            samples.append(tokenizer.decode(ids))
    if sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in samples) < cfg["max_length"]:
        raise Refused(
            "CALIBRATION_TOO_SHORT",
            f"AutoAWQ needs at least calibration_max_length={cfg['max_length']} "
            "calibration tokens in all; add samples or lower calibration_max_length",
        )
    events.log("calibration prepared", samples=len(samples))
    quant_config = {
        "zero_point": True,
        "q_group_size": cfg["group_size"],
        "w_bit": cfg["bits"],
        "version": "GEMM",
        "modules_to_not_convert": [n.split(".")[-1] for n in skipped if not n.endswith("lm_head")] or None,
    }
    model.quantize(
        tokenizer,
        quant_config=quant_config,
        calib_data=samples,
        max_calib_samples=len(samples),
        max_calib_seq_len=cfg["max_length"],
        n_parallel_calib_samples=1,
    )
    events.progress(0.75, "saving")
    model.save_quantized(str(out))
    tokenizer.save_pretrained(out)


def run_bitsandbytes(cfg: dict[str, Any], events: Events, src: Path, out: Path, tokenizer: Any) -> None:
    if not _cuda():
        raise Refused("HARDWARE_UNSUPPORTED", "bitsandbytes quantization needs a CUDA GPU; this node has none")
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if cfg["method"] == "bnb-nf4":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, device_map="cuda:0")
    events.progress(0.75, "saving")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------- reload


def load_quantized(cfg: dict[str, Any], out: Path) -> Any:
    """The saved checkpoint, loaded back as the serving side would read it (None: not loadable here)."""
    backend = cfg["backend"]
    if backend == "gptqmodel":
        from gptqmodel import GPTQModel

        return GPTQModel.load(str(out)).model
    if backend == "autoawq" and not _cuda():
        return None  # AutoAWQ's GEMM kernels need CUDA (or IPEX); vLLM checks it instead
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, device_map="cuda:0" if _cuda() else None)


def main(argv: list[str]) -> int:
    cfg = json.loads(Path(argv[0]).read_text())
    events = Events(int(argv[1]))
    started = time.monotonic()
    try:
        result = run(cfg, events)
    except Refused as e:
        events.send("error", reason=e.reason, message=str(e))
        return 2
    result["seconds"] = round(time.monotonic() - started, 2)
    result["peak_rss_bytes"] = peak_rss_bytes()
    events.send("result", **result)
    return 0


def run(cfg: dict[str, Any], events: Events) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    src, out = Path(cfg["source_dir"]), Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    versions = library_versions(cfg["backend"])
    events.log(
        "quantizer started",
        method=cfg["method"],
        backend=cfg["backend"],
        bits=cfg["bits"],
        group_size=cfg["group_size"],
        libraries=versions,
    )
    if cfg["backend"] == "bitsandbytes" and not _cuda():
        raise Refused("HARDWARE_UNSUPPORTED", "bitsandbytes quantization needs a CUDA GPU; this node has none")
    tokenizer = AutoTokenizer.from_pretrained(src)
    model: Any = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    model.eval()
    skipped = skipped_linears(model, cfg["group_size"])
    if not quantizable(model, skipped):
        raise Refused(
            "NOTHING_TO_QUANTIZE",
            f"no linear layer's input size is a multiple of group size "
            f"{cfg['group_size']}; choose a smaller group size or -1 (per channel)",
        )
    grouped_out = [n for n in skipped if not n.endswith("lm_head")]
    if grouped_out:
        events.log(
            "layers left unquantized (input size not a multiple of the group size)",
            group_size=cfg["group_size"],
            layers=grouped_out[:50],
            count=len(grouped_out),
        )
    heldout = Path(cfg["heldout_file"]).read_text(encoding="utf-8")
    chunks = eval_chunks(tokenizer, heldout, cfg["eval_seq_len"], cfg["eval_tokens"])
    events.progress(0.05, "scoring the source")
    src_ppl, src_top, _, tokens = score(model, chunks)
    Path(cfg["work_dir"], "source_top1.json").write_text(json.dumps({"chunks": chunks, "top1": src_top}))
    events.log("source scored", perplexity=round(src_ppl, 4), tokens=tokens)
    events.progress(0.15, "quantizing")
    report_layer_progress(events, 0.15, 0.75)
    texts = read_texts(cfg.get("calibration_file"))
    t0 = time.monotonic()
    backend = cfg["backend"]
    if backend == "llm_compressor":
        run_llm_compressor(cfg, texts, events, src, out, model, tokenizer, skipped)
    else:
        del model
        gc.collect()
        if backend == "gptqmodel":
            run_gptqmodel(cfg, texts, events, src, out, tokenizer, skipped)
        elif backend == "autoawq":
            run_autoawq(cfg, texts, events, src, out, tokenizer, skipped)
        else:
            run_bitsandbytes(cfg, events, src, out, tokenizer)
    quantize_s = time.monotonic() - t0
    events.log("quantized and saved", seconds=round(quantize_s, 2))
    model = None
    gc.collect()
    events.progress(0.8, "loading the result")
    quantized = load_quantized(cfg, out)
    result: dict[str, Any] = {
        "library_versions": versions,
        "unquantized_layers": grouped_out,
        "quantize_seconds": round(quantize_s, 2),
        "source_perplexity": src_ppl,
        "eval_tokens": tokens,
    }
    if quantized is None:
        result["verified_with"] = ""
        return result
    quantized.eval()
    events.progress(0.9, "scoring the result")
    q_ppl, _, agreement, _ = score(quantized, chunks, src_top)
    events.log("quantized model scored", perplexity=round(q_ppl, 4), top1_agreement=round(agreement or 0.0, 4))
    answer = generate(quantized, tokenizer, cfg["prompt"])
    events.log("generation check", answer=answer)
    result.update(quantized_perplexity=q_ppl, top1_agreement=agreement, answer=answer, verified_with="transformers")
    return result


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception:  # noqa: BLE001 - the job reports the traceback's last line
        traceback.print_exc()
        sys.exit(1)
