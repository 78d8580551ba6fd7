"""A `.gguf` file as a base model: read once through transformers' GGUF support, kept as safetensors.

transformers dequantizes the file's blocks into a dense model; that model is written once into a
cache folder keyed by the file's sha256 (config, bf16 safetensors weights, the tokenizer with its
chat template), and every stage then loads the folder like any local model, in 4-bit NF4.

bf16 loses nothing that matters here: its rounding (2**-9 of a weight) is far below the step of
the file's own 4-5 bit quantization (about 1/16 of a block's range).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from qlora_pipeline.errors import ModelError

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
SOURCE_FILE = "gguf_source.json"
_CHUNK_BYTES = 1 << 20


def is_gguf(name: str) -> bool:
    return name.lower().endswith(GGUF_SUFFIX)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the lineage id that stands in for a hub revision)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def supported_architectures() -> list[str]:
    """GGUF `general.architecture` values this transformers version can read."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def gguf_architecture(path: str | Path) -> str:
    """The file's `general.architecture` (read by the gguf package; raises ModelError if unreadable)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (KeyError, ValueError, OSError, IndexError) as exc:
        raise ModelError(f"model.name: {path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def check_architecture(path: str | Path) -> str:
    """The file's architecture, or a ModelError naming the ones transformers can read."""
    arch = gguf_architecture(path)
    supported = supported_architectures()
    if arch not in supported:
        raise ModelError(
            f"model.name: {path} holds a {arch!r} model, which transformers cannot read from GGUF; "
            f"supported GGUF architectures: {', '.join(supported)}. Use a hub id or a safetensors folder of it instead"
        )
    return arch


def _load_dense(path: Path):
    """Tokenizer and dense (dequantized) model from a GGUF file, through transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # newer transformers keep GGUF blocks packed unless asked to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs)
    return tokenizer, model


def _plain_copy(model, dtype: torch.dtype):
    """The same weights in a model built from the config alone (GGUF-loaded models refuse to save)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"model.name: GGUF conversion left weights unset {missing[:5]} or unused {unexpected[:5]}")
    fresh.tie_weights()
    return fresh.to(dtype).eval()


def ensure_converted(path: str | Path, cache_dir: str | Path) -> tuple[Path, str]:
    """The safetensors folder for a GGUF file (converted on first use) and the file's sha256.

    Raises ModelError when the file is missing, unreadable, or of an architecture transformers
    cannot read from GGUF. The folder appears atomically: a killed conversion leaves nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"model.name: GGUF file {path} does not exist; run `make models` for the demo model, "
            "or point model.name at a .gguf file"
        )
    sha = file_sha256(path)
    target = Path(cache_dir) / "gguf" / sha[:16]
    if (target / SOURCE_FILE).is_file():
        return target, sha
    arch = check_architecture(path)
    log.info("converting %s (%s) to safetensors in %s", path.name, arch, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:16]}-", dir=target.parent))
    try:
        tokenizer, model = _load_dense(path)
        _plain_copy(model, torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"file": path.name, "sha256": sha, "architecture": arch}, indent=2) + "\n")
        if (target / SOURCE_FILE).is_file():  # a concurrent conversion finished first
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, sha
