"""Ranks per module: a default rank and alpha with peft's `rank_pattern` / `alpha_pattern` exceptions.

A client may train different ranks on different modules (the FlexLoRA paper's tiers: 30 on the attention
projections, 200 on the MLP). Patterns are keyed the way peft keys them and resolved the way peft resolves them
(`peft.utils.other.get_pattern_key`): the first key, in order, that matches the end of a module's name after a
dot (`(.*\\.)?(key)$`) gives that module's rank (or alpha); no match, the default. Keys on the wire are module
names or their tails (letters, digits, `_` and `.`), so a header never carries an arbitrary regex.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

RankPattern = tuple[tuple[str, int], ...]
AlphaPattern = tuple[tuple[str, float], ...]


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# Named rank patterns (ranks per module, keyed as peft's rank_pattern). paper-type2: the FlexLoRA paper's
# per-module tier, 30 on the attention projections and 200 on the MLP's (LLaMA module names).
RANK_PATTERNS: dict[str, dict[str, int]] = {
    "paper-type2": {**dict.fromkeys(_ATTENTION, 30), **dict.fromkeys(_MLP, 200)},
}


def parse_rank_pattern(text: str) -> dict[str, int]:
    """`q_proj=30,gate_proj=200` (module name or tail = rank, in order: the first matching key wins, as in peft),
    or the name of a preset in RANK_PATTERNS; '' or 'none' for none."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return {}
    if text.lower() in RANK_PATTERNS:
        return dict(RANK_PATTERNS[text.lower()])
    out: dict[str, int] = {}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key or not value.isdigit():
            presets = ", ".join(sorted(RANK_PATTERNS))
            raise ValueError(f"rank pattern entry {part!r} is not module=rank (or give a preset: {presets})")
        if key in out:
            raise ValueError(f"rank pattern names {key!r} twice")
        out[key] = int(value)
    return out


_WIRE_KEY = re.compile(r"[A-Za-z0-9_.]+")


@lru_cache(maxsize=1024)
def _matchers(keys: tuple[str, ...]) -> tuple[tuple[str, bool, re.Pattern[str] | None], ...]:
    """Per key: whether it is a wire key, and the pattern it is matched with (None: a wire key without dots,
    matched by plain comparison)."""
    out: list[tuple[str, bool, re.Pattern[str] | None]] = []
    for key in keys:
        if _WIRE_KEY.fullmatch(key) is None:  # a caller's own regex, not a wire key: peft's search as it is
            out.append((key, False, re.compile(rf"(.*\.)?({key})$")))
        else:
            out.append((key, True, re.compile(key) if "." in key else None))
    return tuple(out)


@lru_cache(maxsize=65536)
def pattern_key(keys: tuple[str, ...], module: str) -> str | None:
    r"""The first of `keys` peft would apply to `module`, or None when none matches.

    peft's `(.*\.)?(key)$`, in linear time: a wire key has a fixed length (its only regex character, `.`, matches
    any one character), so it can only match the module's last len(key) characters, after the start or a dot.
    The backtracking search took 56 ms per module for 236 keys of 254 characters and a name of 256 (8.5 ms once
    compiled): a header of such keys and a payload of such names held a check-ahead thread for minutes."""
    for key, wire, pattern in _matchers(keys):
        if not wire:
            if pattern is not None and pattern.match(module):
                return key
            continue
        n = len(key)
        if len(module) < n or (len(module) > n and module[-n - 1] != "."):
            continue
        tail = module[-n:]
        if tail == key or (pattern is not None and pattern.fullmatch(tail)):
            return key
    return None


@dataclass(frozen=True, order=True)
class RankRequest:
    """A rank and alpha some client needs its adapter cut at; with patterns, per module (see the module's doc)."""

    rank: int
    alpha: float
    rank_pattern: RankPattern = ()
    alpha_pattern: AlphaPattern = ()

    @classmethod
    def of(
        cls,
        rank: int,
        alpha: float,
        rank_pattern: Mapping[str, int] | None = None,
        alpha_pattern: Mapping[str, float] | None = None,
    ) -> RankRequest:
        """From peft-style dicts (their order is kept: the first matching key wins)."""
        return cls(
            rank,
            float(alpha),
            tuple((k, int(v)) for k, v in (rank_pattern or {}).items()),
            tuple((k, float(v)) for k, v in (alpha_pattern or {}).items()),
        )

    @classmethod
    def exact(cls, per_module: Mapping[str, RankRequest]) -> RankRequest:
        """A request that resolves to `per_module[m]` on every module m (uniform requests): one pattern entry per
        module tail (`q_proj`) where all its modules agree, else per module name; the commonest is the default."""
        if not per_module:
            raise ValueError("no modules")
        values = list(per_module.values())
        default = max(set(values), key=lambda v: (values.count(v), v))
        by_tail: dict[str, set[RankRequest]] = {}
        for module, req in per_module.items():
            by_tail.setdefault(module.rsplit(".", 1)[-1], set()).add(req)
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        for module, req in sorted(per_module.items()):
            tail = module.rsplit(".", 1)[-1]
            key = tail if len(by_tail[tail]) == 1 else module
            if req.rank != default.rank:
                ranks[key] = req.rank
            if req.alpha != default.alpha:
                alphas[key] = req.alpha
        out = cls.of(default.rank, default.alpha, ranks, alphas)
        for module, req in per_module.items():  # a tail key must not catch a module named by its full name
            if out.at(module) != req:
                raise ValueError(f"module names {sorted(per_module)[:3]}… cannot be told apart by patterns")
        return out

    @property
    def uniform(self) -> bool:
        return not self.rank_pattern and not self.alpha_pattern

    def at(self, module: str) -> RankRequest:
        """The plain (rank, alpha) of one module."""
        if self.uniform:
            return self
        rank_key = pattern_key(tuple(k for k, _ in self.rank_pattern), module)
        alpha_key = pattern_key(tuple(k for k, _ in self.alpha_pattern), module)
        rank = dict(self.rank_pattern)[rank_key] if rank_key is not None else self.rank
        alpha = dict(self.alpha_pattern)[alpha_key] if alpha_key is not None else self.alpha
        return RankRequest(rank, alpha)

    def ranks(self, modules: Iterable[str]) -> dict[str, int]:
        return {m: self.at(m).rank for m in modules}

    def max_rank(self, modules: Iterable[str]) -> int:
        return max(self.ranks(modules).values(), default=self.rank)

    def all_ranks(self) -> set[int]:
        """Every rank this request can resolve to, whatever the modules (the default's among them)."""
        return {self.rank, *(r for _, r in self.rank_pattern)}

    def scales(self) -> set[float]:
        """Every alpha / rank a module can get (an over-estimate: each rank with each alpha)."""
        alphas = {self.alpha, *(a for _, a in self.alpha_pattern)}
        return {a / r for a in alphas for r in self.all_ranks()}

    @property
    def tag(self) -> str:
        """'' for a uniform request, else a short digest of its patterns (to key stored cuts apart)."""
        if self.uniform:
            return ""
        text = json.dumps([self.rank_pattern, self.alpha_pattern], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """'rank 8' or 'rank 8 (q_proj=30, gate_proj=200)': for logs and refusals."""
        if not self.rank_pattern:
            return f"rank {self.rank}"
        return f"rank {self.rank} ({', '.join(f'{k}={r}' for k, r in self.rank_pattern)})"
