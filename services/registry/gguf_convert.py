"""Convert a GGUF model file into a safetensors model folder (run as a child process).

``python -m services.registry.gguf_convert FILE.gguf DEST_DIR``: transformers dequantizes the
GGUF weights on load; a plain model built from the same config receives the state dict and is
saved as safetensors, with the tokenizer (and its chat template) next to it. Runs in its own
process so the memory it needs (about 10x the GGUF size) is returned to the OS afterwards and a
crash cannot take the registry down.
"""

from __future__ import annotations

import sys
from pathlib import Path


def convert_gguf(gguf_path: Path, dest: Path) -> None:
    """Write ``dest`` (config.json, model.safetensors, tokenizer files) from ``gguf_path``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(plain)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch after GGUF load: missing={missing[:5]} unexpected={unexpected[:5]}")
    del loaded
    dest.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(dest), safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(dest))


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if not isinstance(tied, dict) else tied.keys())


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m services.registry.gguf_convert FILE.gguf DEST_DIR", file=sys.stderr)
        return 2
    try:
        convert_gguf(Path(argv[0]), Path(argv[1]))
    except Exception as exc:  # noqa: BLE001 - reported to the parent through stderr and the exit code
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
