"""Pydantic models of the messages: an update from an edge client, an adapter release to one."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    model_serializer,
    model_validator,
)

from schemas.errors import HeaderError
from schemas.ranks import RankRequest
from schemas.recipe import Recipe

SCHEMA_VERSION: Literal[1] = 1
# AMQP header that carries the JSON of the models below; the body is the safetensors payload.
HEADER_KEY = "x-flexlora-header"
REASON_KEY = "x-flexlora-reason"
DETAIL_KEY = "x-flexlora-detail"
# A refusal notice in a client's mailbox (no body): the update id an aggregator dead-lettered, with REASON_KEY and
# DETAIL_KEY. A client acts only on one naming the update it waits on (ids are random: no one else can name it).
REFUSED_KEY = "x-flexlora-refused"
# Reasons a client meets by training again from the newest version; any other refusal stops it, saying why.
RETRAIN_REASONS = frozenset({"stale", "version", "norm-outlier"})
# Headers a dead-lettered copy lost because the whole table would not have fitted (see MAX_HEADERS_BYTES).
DROPPED_KEY = "x-flexlora-dropped-headers"
# A message whose string headers take more than this is refused ("header-size") before anything is parsed;
# an honest update's headers take about 2 KiB, and RabbitMQ's frame limit (128 KiB) bounds them anyway.
MAX_HEADERS_BYTES = 64 * 1024

_M = TypeVar("_M", bound=BaseModel)

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
# A client id a client may claim: ids that begin with "_" (the global release, "_global") or "." / "-" are
# reserved for the federation's own bookkeeping.
ClientId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]

# Bounds on the numbers a client declares, so no finite but extreme value reaches the arithmetic: α and the
# LoRA scale α/r (1e200 would overflow a round; 5e-324 divides a release cut by zero), the sample count a
# client's weight comes from (exact in a float, and far beyond any real data set), and reported figures.
MIN_ALPHA, MAX_ALPHA = 1e-3, 1e4
MIN_SCALE, MAX_SCALE = 1e-4, 1e3
MAX_SAMPLES = 10**12
MAX_VERSION = 2**53
MAX_LOSS = 1e6
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.]+$")]
# Ranks per module, keyed as peft's rank_pattern / alpha_pattern are (schemas.ranks): a module name or its tail.
Rank = Annotated[int, Field(ge=1, le=4096)]
Alpha = Annotated[float, Field(ge=MIN_ALPHA, le=MAX_ALPHA, allow_inf_nan=False)]
MAX_PATTERN_KEYS = 256
RankPatternField = Annotated[dict[ModuleName, Rank], Field(max_length=MAX_PATTERN_KEYS)]
AlphaPatternField = Annotated[dict[ModuleName, Alpha], Field(max_length=MAX_PATTERN_KEYS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PayloadInfo(_Strict):
    """Integrity fields of the safetensors body that travels beside a header."""

    size: int = Field(ge=0, le=2**50)
    sha256: Sha256


class _Ranked(_Strict):
    """`rank` and `lora_alpha` are every module's unless `rank_pattern` / `alpha_pattern` say otherwise (peft's
    semantics: the first matching key, see schemas.ranks); messages without patterns are uniform."""

    rank: Rank
    lora_alpha: Alpha
    rank_pattern: RankPatternField = Field(default_factory=dict)
    alpha_pattern: AlphaPatternField = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _without_empty_patterns(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A uniform message is written as before patterns existed, so peers that predate them still read it.
        data: dict[str, Any] = handler(self)
        for name in ("rank_pattern", "alpha_pattern"):
            if not data.get(name):
                data.pop(name, None)
        return data

    @property
    def request(self) -> RankRequest:
        """The ranks (per module) this message states, as the aggregation math takes them."""
        return RankRequest.of(self.rank, self.lora_alpha, self.rank_pattern, self.alpha_pattern)

    def _check_scales(self) -> None:
        for scale in sorted(self.request.scales()):
            if not MIN_SCALE <= scale <= MAX_SCALE:
                raise ValueError(
                    f"lora_alpha / rank = {scale:.4g} (for some module, by the patterns) is outside "
                    f"[{MIN_SCALE:g}, {MAX_SCALE:g}]"
                )


class LoraUpdate(_Ranked):
    """One client's locally trained LoRA factors, trained from global version `base_version`."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["update"] = "update"
    update_id: Annotated[str, StringConstraints(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9\-]+$")] = Field(
        default_factory=lambda: str(uuid.uuid4())
    )
    federation: Identifier
    client_id: ClientId
    base_version: int = Field(ge=0, le=MAX_VERSION)
    num_samples: int = Field(ge=1, le=MAX_SAMPLES)
    target_modules: tuple[ModuleName, ...] = Field(min_length=1)
    base_model_fingerprint: Sha256
    payload: PayloadInfo
    train_loss: float | None = Field(default=None, ge=-MAX_LOSS, le=MAX_LOSS, allow_inf_nan=False)
    # ROUGE-L of global version `base_version` on the client's own held-out examples (None: not measured).
    eval_score: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    created_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @model_validator(mode="after")
    def _unique_modules(self) -> LoraUpdate:
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("target_modules has duplicates")
        self._check_scales()
        return self


class PrivacySpent(_Strict):
    """Client-level differential privacy spent by a federation up to and including a version
    (aggregator.privacy): (ε, δ) after `rounds` private rounds, each clipping a client's change to `clip_norm`
    and adding noise of `noise_multiplier`·`clip_norm`, sampling `sampling_rate` of the federation's clients."""

    epsilon: float = Field(ge=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    rounds: int = Field(ge=1)
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    sampling_rate: float = Field(gt=0, le=1)
    clip_norm: float = Field(gt=0, allow_inf_nan=False)
    epsilon_budget: float | None = Field(default=None, gt=0)


# The client id of a release shared by several clients: no client can have it (client ids start alphanumeric).
SHARED_RELEASE = "_shared"


class AdapterRelease(_Ranked):
    """The global adapter of `version`, cut to one client's rank and alpha. `client_id` SHARED_RELEASE: one
    message shared by every participant cut the same way, routed by the broker to each of their mailboxes (the
    recipients are not named in it, so no client learns who else took part)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["adapter"] = "adapter"
    federation: Identifier
    version: int = Field(ge=1, le=MAX_VERSION)
    client_id: Identifier
    target_modules: tuple[ModuleName, ...] = Field(min_length=1)
    base_model_fingerprint: Sha256
    strategy: Identifier = "flexlora"
    num_updates: int = Field(ge=1)
    payload: PayloadInfo
    created_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))
    # How the federation's clients train (the aggregator's setting); a client follows what it was not given.
    recipe: Recipe | None = None
    # With client-level differential privacy: what the federation has spent, this version included.
    privacy: PrivacySpent | None = None


class JoinRequest(_Ranked):
    """A client starting (or back after being offline) asks for the newest global adapter at its rank."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["join"] = "join"
    federation: Identifier
    client_id: ClientId
    target_modules: tuple[ModuleName, ...] = Field(min_length=1)
    base_model_fingerprint: Sha256
    have_version: int = Field(ge=0, le=MAX_VERSION)

    @model_validator(mode="after")
    def _scale_in_bounds(self) -> JoinRequest:
        self._check_scales()
        return self


def parse_join(raw: str | bytes | None) -> JoinRequest:
    """Parse a join request header (see parse_update)."""
    return _parse(JoinRequest, raw)


def parse_update(raw: str | bytes | None) -> LoraUpdate:
    """Parse an update header, converting pydantic's error into a HeaderError with a readable detail."""
    return _parse(LoraUpdate, raw)


def parse_release(raw: str | bytes | None) -> AdapterRelease:
    """Parse an adapter-release header (see parse_update)."""
    return _parse(AdapterRelease, raw)


def _parse(model: type[_M], raw: str | bytes | None, key: str = HEADER_KEY) -> _M:
    if raw is None:
        raise HeaderError(f"message has no {key} header")
    try:
        # Strict models still accept ISO datetimes and arrays-as-tuples from JSON: that is JSON mode.
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise HeaderError(f"invalid {model.__name__} header: {problems}") from exc
