"""PEFT LoRA adapter directories in and out: adapter_config.json plus adapter_model.safetensors, never pickle."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from schemas.errors import SchemaError
from schemas.lora import PEFT_PREFIX, LoraFactors, RankRequest, join_lora, split_lora
from schemas.tensors import decode_tensors, encode_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"

# Config fields that change what the factors mean (scaling, extra trained weights, other layer types); an adapter
# using any of them is not the plain (alpha / r) · B · A update that the aggregation math assumes.
_UNSUPPORTED = (
    "use_dora",
    "use_rslora",
    "modules_to_save",
    "fan_in_fan_out",
    "lora_bias",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "megatron_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
)
# Template fields that say where the adapter applies rather than what it holds; outputs inherit them.
_INHERITED = ("task_type", "revision", "layers_to_transform", "layers_pattern", "exclude_modules")
# PEFT saves named adapters as `...lora_A.<adapter name>.weight` in some code paths; the wire layout has no name.
_NAMED_KEY = re.compile(r"\.lora_(?P<factor>[AB])\.[A-Za-z0-9_\-]+\.weight$")


class AdapterFileError(ValueError):
    """An adapter directory that cannot be read or written as a plain PEFT LoRA adapter."""


@dataclass(frozen=True)
class PeftAdapter:
    """One PEFT LoRA adapter as read from disk; `config` is the raw adapter_config.json."""

    factors: dict[str, LoraFactors]
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None
    config: dict[str, Any]
    # peft's rank_pattern / alpha_pattern: modules whose rank or alpha is not `rank` / `alpha` (schemas.ranks).
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @property
    def request(self) -> RankRequest:
        """The ranks per module the adapter was trained at."""
        return RankRequest.of(self.rank, self.alpha, self.rank_pattern, self.alpha_pattern)


def read_adapter(path: Path) -> PeftAdapter:
    """Read and validate a PEFT LoRA adapter directory; raises AdapterFileError naming the directory."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"{path}: not a directory")
    config = _read_config(path)
    rank, alpha, targets = _check_config(path, config)
    rank_pattern, alpha_pattern = _check_patterns(path, config)
    tensors = _read_tensors(path)
    try:
        factors = split_lora(_normalise_keys(tensors), rank=RankRequest.of(rank, alpha, rank_pattern, alpha_pattern))
    except SchemaError as exc:
        raise AdapterFileError(f"{path}: {exc}") from exc
    regex = isinstance(config.get("target_modules"), str)
    for module in factors:
        if regex:
            matched = re.fullmatch(str(config["target_modules"]), module) is not None
        else:
            matched = any(module == t or module.endswith(f".{t}") for t in targets)
        if not matched:
            raise AdapterFileError(f"{path}: module {module!r} is not one of target_modules {config['target_modules']}")
    if regex:
        # A regex names no modules by itself; what the tensors adapt is what the adapter targets.
        targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in factors}))
    base = config.get("base_model_name_or_path")
    return PeftAdapter(factors, rank, alpha, targets, str(base) if base else None, config, rank_pattern, alpha_pattern)


def _check_patterns(path: Path, config: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, float]]:
    """rank_pattern and alpha_pattern of a config (absent or null: none), checked for positive numbers."""
    out: list[dict[str, Any]] = []
    for name, kind in (("rank_pattern", int), ("alpha_pattern", int | float)):
        value = config.get(name) or {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) and v > 0 for k, v in value.items()
        ):
            raise AdapterFileError(f"{path}: {name} must map module names to positive numbers, got {value!r}")
        out.append({k: (v if name == "rank_pattern" else float(v)) for k, v in value.items()})
    return out[0], out[1]


def write_adapter(
    path: Path,
    factors: Mapping[str, LoraFactors],
    rank: int,
    alpha: float,
    target_modules: Sequence[str] | str,
    *,
    base_model_name_or_path: str | None = None,
    template_config: Mapping[str, Any] | None = None,
    pattern: RankRequest | None = None,
) -> None:
    """Write a directory that `PeftModel.from_pretrained` loads: adapter_config.json and adapter_model.safetensors.
    `pattern`: ranks per module (its rank_pattern and alpha_pattern go into the config; `rank` and `alpha` are
    the default)."""
    path = Path(path)
    if not factors:
        raise AdapterFileError(f"{path}: no LoRA factors to write")
    request = RankRequest(rank, alpha, pattern.rank_pattern, pattern.alpha_pattern) if pattern else None
    for module, (a, b) in factors.items():
        r = request.at(module).rank if request is not None else rank
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterFileError(
                f"{path}: module {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, not rank {r}"
            )
    template = dict(template_config or {})
    inherited = {k: template[k] for k in _INHERITED if template.get(k) is not None}
    inherited.setdefault("task_type", "CAUSAL_LM")
    if base_model_name_or_path is None and template.get("base_model_name_or_path"):
        base_model_name_or_path = str(template["base_model_name_or_path"])
    targets: list[str] | str = target_modules if isinstance(target_modules, str) else sorted(set(target_modules))
    lora_alpha = int(alpha) if float(alpha).is_integer() else alpha
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,  # type: ignore[arg-type]  # peft computes alpha / r in float; fractions are fine
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=False,
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path,
        rank_pattern=dict(request.rank_pattern) if request is not None else {},
        alpha_pattern={k: int(a) if a.is_integer() else a for k, a in request.alpha_pattern} if request else {},
        **inherited,
    ).to_dict()
    data, _ = encode_tensors(join_lora({m: LoraFactors(f.A, f.B) for m, f in factors.items()}))
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True) + "\n")
    (path / WEIGHTS_FILE).write_bytes(data)


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFileError(f"{path}: no {CONFIG_FILE}; not a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path}: {CONFIG_FILE} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path}: {CONFIG_FILE} is not a JSON object")
    return config


def _check_config(path: Path, config: Mapping[str, Any]) -> tuple[int, float, tuple[str, ...]]:
    """Rank, alpha and target modules of a plain LoRA config; refuses what the aggregation cannot express."""
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    used = [name for name in _UNSUPPORTED if config.get(name)]
    if config.get("bias") not in (None, "none"):
        used.append(f"bias={config['bias']!r}")
    if used:
        raise AdapterFileError(f"{path}: uses {', '.join(used)}, which cannot be aggregated as plain LoRA factors")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterFileError(f"{path}: r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha", 8)  # PEFT's own default when the field is absent
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise AdapterFileError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return rank, float(alpha), (targets,)
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterFileError(f"{path}: target_modules must be a non-empty list of names or a regex, got {targets!r}")
    return rank, float(alpha), tuple(sorted(set(targets)))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_WEIGHTS_FILE).exists():
            raise AdapterFileError(
                f"{path}: only {PICKLE_WEIGHTS_FILE} is present; pickle files are not loaded (they can run code). "
                f"Re-save the adapter with save_pretrained(..., safe_serialization=True) to get {WEIGHTS_FILE}"
            )
        raise AdapterFileError(f"{path}: no {WEIGHTS_FILE}")
    try:
        return decode_tensors(weights.read_bytes())
    except (OSError, SchemaError) as exc:
        raise AdapterFileError(f"{path}: {WEIGHTS_FILE}: {exc}") from exc


def _normalise_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`...lora_A.default.weight` → `...lora_A.weight`; other keys pass through for split_lora to judge."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        plain = _NAMED_KEY.sub(r".lora_\g<factor>.weight", key) if key.startswith(PEFT_PREFIX) else key
        if plain in out:
            raise SchemaError(f"tensor {key!r} duplicates {plain!r}; the file holds more than one adapter")
        out[plain] = tensor
    return out


def _jsonable(value: Any) -> Any:
    """peft's config dict as JSON: sets become sorted lists, enums their string values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return [_jsonable(v) for v in value]
    if isinstance(value, Enum):
        return _jsonable(value.value)  # PeftType and TaskType: str() would give "PeftType.LORA"
    return value
