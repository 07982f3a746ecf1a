"""How one aggregator process is configured: its identity, round policy, strategy and housekeeping."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from aggregator.lowrank import SvdMode
from aggregator.planning import ServerStep
from aggregator.privacy import PrivacyConfig
from aggregator.registry import served, strategy_spec
from aggregator.rounds import RoundPolicy
from aggregator.security import Guard, load_signing_keys
from aggregator.strategies import Strategy, Weighting, get_strategy, get_weighting
from aggregator.validation import Limits
from broker.topology import Topology
from schemas.chunks import DEFAULT_CHUNK_BYTES
from schemas.recipe import DEFAULT_RECIPE, Recipe

if TYPE_CHECKING:
    from aggregator.settings import AggregatorSettings


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class AggregatorConfig:
    federation: str
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    lease_s: float = 120.0
    prefetch: int = 8
    poll_s: float = 0.2
    republish_every_s: float = 10.0
    owner: str = field(default_factory=default_owner)
    strategy: str = "flexlora"
    # How the federation's clients train, sent with every release (clients follow what they were not given).
    recipe: Recipe = DEFAULT_RECIPE
    svd_mode: SvdMode = "exact"
    weighting: str = "data_size"
    staleness_exponent: float = 0.5
    # Updates trained from a version more than this many rounds old are dead-lettered ("stale").
    max_staleness: int | None = None
    health_every_s: float = 5.0
    # The global adapter is also cut (and stored) at this rank, so a joining client of any rank up to it
    # gets an exact cut of the newest ΔW at once (FlexLoRA only: its cuts nest).
    global_rank: int = 64
    # The server step (aggregator.planning): average the clients' changes from the global each started from,
    # carrying what a client could not hold at its rank, and scale them by server_lr (strategies that sum
    # products only: FlexLoRA; the others ignore it). On by default, chosen by experiment (docs/experiments.md);
    # False is the paper's plain sum of products.
    carry_residual: bool = True
    server_lr: float = 1.0
    # Update payloads and releases of versions older than this many are dropped from the store (history,
    # update ids and membership stay); None keeps everything.
    keep_versions: int | None = 20
    # Payloads above this size travel as chunks of this size (updates, and adapters sent to clients).
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # Updates declaring a larger payload are refused ("too-large") from their header, before any chunk is kept.
    max_update_bytes: int | None = 2 * 1024**3
    # Factors of updates this process recorded, kept decoded (up to this many bytes) so that a round it finalises
    # reads back from the store only the updates other aggregators recorded (aggregator.held); 0 holds none.
    hold_bytes: int = 1024**3
    # Dense sums of the open round (FlexLoRA's ΔW per module and base version) this process folds updates into
    # as it records them, so that closing the round is an SVD (aggregator.folding); 0 folds nothing.
    fold_bytes: int = 1024**3
    # A chunked update that gets no new chunk for this long is dropped and reported, never counted.
    transfer_expiry_s: float = 300.0
    # Bounds an update must keep (refused "rank", "norm"); an update whose ‖ΔW‖ exceeds this factor times the
    # median of the open round's (once it holds 3) is refused "norm-outlier".
    min_rank: int = 1
    max_rank: int | None = None
    max_update_norm: float | None = None
    norm_outlier_factor: float | None = None
    # No client's share of a round's weight exceeds this (the excess is spread over the others), however many
    # samples it claims; None: shares follow the weighting alone.
    max_weight_share: float | None = None
    # Chunked updates under way at once, per client and in the whole federation; a first chunk past either
    # is refused ("transfers").
    max_transfers_per_client: int = 4
    max_transfers: int = 256
    # Senders must be the broker user provisioned for the client they name (see aggregator.security), and
    # sign their headers when signing keys are given.
    require_identity: bool = False
    signing_keys: Mapping[str, bytes] | None = None
    # Client-level differential privacy (aggregator.privacy); None: off.
    privacy: PrivacyConfig | None = None
    # While the round store is unreachable an update is held and retried: until it answers (None), or this long
    # before being given back (each give-back counts towards the updates queue's delivery limit of 5, after which
    # RabbitMQ dead-letters the update). RabbitMQ's consumer timeout (30 min by default) closes a channel holding
    # a delivery longer, which counts as one give-back: outages up to 5 × that lose nothing.
    store_retry_s: float | None = None
    # Re-raise unexpected errors instead of requeueing: for tests and the embedded demo, where a bug
    # should fail loudly rather than loop through redeliveries.
    fail_fast: bool = False

    def __post_init__(self) -> None:
        self.server_step  # noqa: B018 -- an invalid server step is refused here, at start-up

    @property
    def server_step(self) -> ServerStep:
        return ServerStep(self.carry_residual, self.server_lr)


def config_from_settings(settings: AggregatorSettings) -> AggregatorConfig:
    """The process's config from its settings: every setting of the same name is copied (a test checks none is
    forgotten); the few that need building (the round policy, the recipe, the signing keys file) are built."""
    same = {
        f.name: getattr(settings, f.name) for f in fields(AggregatorConfig) if f.name in type(settings).model_fields
    }
    keys = settings.signing_keys
    same.update(
        policy=settings.policy(),
        recipe=settings.recipe(),
        signing_keys=load_signing_keys(keys) if keys is not None else None,
        privacy=settings.privacy(),
    )
    return AggregatorConfig(**same)


def limits(config: AggregatorConfig) -> Limits:
    return Limits(config.max_update_bytes, config.min_rank, config.max_rank, config.max_update_norm)


def guard(config: AggregatorConfig) -> Guard | None:
    if not config.require_identity and config.signing_keys is None:
        return None
    return Guard(Topology(config.federation), config.require_identity, config.signing_keys)


def build_aggregation(config: AggregatorConfig) -> tuple[Strategy, Weighting]:
    """The federation's strategy and weighting; refused at start-up, not at the first round, when unusable."""
    spec = strategy_spec(config.strategy)
    if spec.merges_into_base:
        # Its clients merge each release into their base weights, which changes the base-model fingerprint
        # every round; the service's pinned-base check does not model that yet.
        raise ValueError(
            f"the {config.strategy} strategy is offline-only for now: use `flexlora aggregate --strategy "
            f"{config.strategy}`; an aggregator serves {', '.join(served())}"
        )
    options: dict[str, object] = {"mode": config.svd_mode} if spec.takes_svd_mode else {}
    strategy = get_strategy(config.strategy, **options)
    weighting_options: dict[str, object] = (
        {"exponent": config.staleness_exponent} if config.weighting == "staleness" else {}
    )
    return strategy, get_weighting(config.weighting, **weighting_options)
