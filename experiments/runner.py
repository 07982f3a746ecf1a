"""The round loop every experiment shares: sample clients, train each from the global adapter at its rank,
send the updates to a federation, evaluate the new global model; over strategies, distributions and seeds."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from aggregator.planning import PLAIN_STEP, Private, ServerStep
from aggregator.privacy import PrivacyConfig, epsilon
from aggregator.registry import STRATEGIES as AGGREGATION_STRATEGIES
from experiments.diagnostics import ClientStep, change_norm, module_norms, tail_share, total
from experiments.federation import Factors, Federation, RoundOutput, make_federation
from experiments.ranks import assign_ranks, sample_clients
from schemas.lora import join_lora
from schemas.messages import LoraUpdate
from schemas.tensors import encode_tensors

# What an experiment can compare, and the aggregation strategy each runs: every registered strategy (with the
# plain server step: the paper's), a `-top` variant of each single-rank one (every client at the top tier instead
# of the lowest: the upper bound of a federation of only strong devices), and a `-carry` variant of each that
# sums products (the server step that carries what a client could not hold, aggregator.planning).
CARRY = "-carry"
STRATEGIES = (
    {name: name for name in AGGREGATION_STRATEGIES}
    | {f"{name}-top": name for name, spec in AGGREGATION_STRATEGIES.items() if spec.single_rank}
    | {f"{name}{CARRY}": name for name, spec in AGGREGATION_STRATEGIES.items() if spec.sums_products}
)
# Those whose clients all train at one rank whatever the distribution: one run per seed stands for all.
SINGLE_RANK = {
    name: max if name.endswith("-top") else min
    for name, strategy in STRATEGIES.items()
    if AGGREGATION_STRATEGIES[strategy].single_rank
}


@dataclass(frozen=True)
class Trained:
    """One client's local result: its factors at its rank, how many samples it trained on, its mean loss."""

    factors: Factors
    num_samples: int
    loss: float | None = None


class Workload(Protocol):
    """What is learned: clients' local training, FLoRA's merge into the base, and the global model's scores."""

    target_modules: tuple[str, ...]
    fingerprint: str
    metrics: tuple[str, ...]  # names `evaluate` returns, e.g. ("unseen", "seen")
    higher_is_better: bool

    def reset(self) -> None:
        """Back to the pristine base model and no client state: called before every run."""

    def alpha(self, rank: int) -> float:
        """The LoRA alpha a client of `rank` trains with (the workload's scaling convention)."""

    def train(self, client: int, rank: int, alpha: float, start: Factors | None) -> Trained:
        """Local training of `client` from `start` (None: a fresh LoRA at `rank`, the same for every client)."""

    def merge(self, factors: Factors, scale: float) -> None:
        """Add scale·B·A of every module into the base weights (FLoRA)."""

    def evaluate(
        self, factors: Factors | None, rank: int, alpha: float, *, round_index: int, last: bool
    ) -> dict[str, float]:
        """Scores of the base plus the global adapter (None: the base alone) after `round_index` rounds (0: the
        base model); a workload may keep its expensive scores for some rounds (and the last)."""


@dataclass(frozen=True)
class RunConfig:
    strategy: str
    distribution: str
    tiers: tuple[int, ...]
    clients: int
    per_round: int
    rounds: int
    seed: int = 0
    broker_url: str = "memory://"
    redis_url: str = "memory://"
    server_lr: float = 1.0  # of the -carry strategies
    # Client-level differential privacy (aggregator.privacy), both or neither; the population is `clients`.
    dp_clip_norm: float | None = None
    dp_noise_multiplier: float | None = None
    dp_delta: float = 1e-5

    @property
    def privacy(self) -> Private | None:
        if self.dp_clip_norm is None or self.dp_noise_multiplier is None:
            return None
        config = PrivacyConfig(self.dp_clip_norm, self.dp_noise_multiplier, self.clients, self.dp_delta, seed=self.seed)
        return Private(config, expected_clients=self.per_round)

    def epsilon_after(self, rounds: int) -> float | None:
        """ε spent after `rounds` private rounds (None without privacy)."""
        private = self.privacy
        if private is None:
            return None
        step = (private.config.noise_multiplier, private.config.sampling_rate(self.per_round))
        return epsilon([step] * rounds, self.dp_delta)

    @property
    def server_step(self) -> ServerStep:
        if self.strategy.endswith(CARRY):
            return ServerStep(carry_residual=True, server_lr=self.server_lr)
        return PLAIN_STEP

    @property
    def eval_rank(self) -> int:
        """The global model is scored at the top tier: the largest adapter any client is sent."""
        return max(self.tiers)

    def client_ranks(self) -> list[int]:
        # FedIT averages factors entrywise, so every client trains at one rank: the weakest client's (or, as
        # an upper bound, the strongest's).
        if self.strategy in SINGLE_RANK:
            return [SINGLE_RANK[self.strategy](self.tiers)] * self.clients
        return assign_ranks(self.clients, self.distribution, self.tiers, self.seed)


@dataclass
class RunResult:
    strategy: str
    distribution: str
    seed: int
    ranks: dict[int, int]  # rank -> clients at it
    scores: list[dict[str, float]]  # index 0: the base model, then one per round
    aggregate_seconds: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    backend: str = ""
    shared_with: list[str] = field(default_factory=list)  # distributions this run stands for (FedIT)
    # Per round: ‖ΔW_global‖_F in all and per module, and every participant's local run (ClientStep).
    global_norm: list[float] = field(default_factory=list)
    module_norms: list[dict[str, float]] = field(default_factory=list)
    clients: list[list[dict[str, Any]]] = field(default_factory=list)
    epsilon: list[float] = field(default_factory=list)  # with differential privacy: ε after each round

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ranks"] = {str(k): v for k, v in self.ranks.items()}
        return out


Tick = Callable[[str], None]


def run_one(
    workload: Workload, config: RunConfig, tick: Tick | None = None, federation: Federation | None = None
) -> RunResult:
    """One federation from the base model for `config.rounds` rounds, scored before and after every round."""
    started = time.monotonic()
    workload.reset()
    ranks = config.client_ranks()
    fed = federation or make_federation(
        STRATEGIES[config.strategy],
        config.per_round,
        config.eval_rank,
        broker_url=config.broker_url,
        redis_url=config.redis_url,
        step=config.server_step,
        privacy=config.privacy,
    )
    top = config.eval_rank
    top_alpha = workload.alpha(top)
    result = RunResult(
        config.strategy,
        config.distribution,
        config.seed,
        {r: ranks.count(r) for r in sorted(set(ranks))},
        [workload.evaluate(None, top, top_alpha, round_index=0, last=config.rounds == 0)],
        backend=type(fed).__name__,
    )
    current: RoundOutput | None = None
    try:
        for round_index in range(config.rounds):
            version = 0 if current is None else current.version
            whole = result.global_norm[-1] if result.global_norm else 0.0  # ‖G‖ of the global the clients start from
            steps: list[ClientStep] = []
            for client in sample_clients(config.clients, config.per_round, round_index, config.seed):
                rank = ranks[client]
                alpha = workload.alpha(rank)
                start = current.cut(rank, alpha) if current is not None and not current.merge_into_base else None
                trained = workload.train(client, rank, alpha, start)
                scale = alpha / rank
                sent = total(module_norms(trained.factors, scale))
                tail = tail_share(whole, total(module_norms(start, scale))) if start is not None else 0.0
                changed = change_norm(trained.factors, scale, start, scale)
                steps.append(ClientStep(rank, sent, changed, trained.loss, tail))
                data, info = encode_tensors(join_lora(trained.factors))
                header = LoraUpdate(
                    federation=fed.name,
                    client_id=f"client-{client}",
                    base_version=version,
                    rank=rank,
                    lora_alpha=alpha,
                    num_samples=trained.num_samples,
                    target_modules=workload.target_modules,
                    base_model_fingerprint=workload.fingerprint,
                    payload=info,
                    train_loss=trained.loss,
                )
                fed.submit(header, data)
                if tick is not None:
                    tick(f"{config.strategy} · {config.distribution} · round {round_index + 1}")
            out = fed.close_round()
            result.aggregate_seconds.append(out.aggregate_seconds)
            norms = module_norms(out.factors, out.top.alpha / out.top.rank)
            result.global_norm.append(total(norms))
            result.module_norms.append(norms)
            result.clients.append([asdict(step) for step in steps])
            spent = config.epsilon_after(round_index + 1)
            if spent is not None:
                result.epsilon.append(spent)
            after, last = round_index + 1, round_index + 1 == config.rounds
            if out.merge_into_base:
                workload.merge(out.factors, out.top.alpha / out.top.rank)
                result.scores.append(workload.evaluate(None, top, top_alpha, round_index=after, last=last))
            else:
                result.scores.append(
                    workload.evaluate(out.cut(top, top_alpha), top, top_alpha, round_index=after, last=last)
                )
            current = out
    finally:
        fed.close()
    result.wall_seconds = time.monotonic() - started
    return result


def plan(
    strategies: Sequence[str],
    distributions: Sequence[str],
    seeds: Sequence[int],
    base: RunConfig,
) -> list[tuple[RunConfig, list[str]]]:
    """Every run to make, with the distributions it stands for. FedIT trains every client at the lowest tier
    whatever the distribution, so it runs once per seed and stands for all of them."""
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    runs: list[tuple[RunConfig, list[str]]] = []
    for seed in seeds:
        for strategy in strategies:
            targets = list(distributions)
            groups = [targets] if strategy in SINGLE_RANK else [[d] for d in targets]
            for group in groups:
                config = RunConfig(**{**asdict(base), "strategy": strategy, "distribution": group[0], "seed": seed})
                runs.append((config, group))
    return runs


def run_all(
    workload: Workload,
    runs: Sequence[tuple[RunConfig, list[str]]],
    console: Console | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Every planned run with one progress bar over all local trainings; FedIT's run is copied to each
    distribution it stands for."""
    console = console or Console(stderr=True)
    total = sum(c.rounds * c.per_round for c, _ in runs)
    results: list[RunResult] = []
    with progress_bar(console) as progress:
        bar = progress.add_task("local trainings", total=total)

        def tick(description: str) -> None:
            progress.update(bar, advance=1, description=description)

        for config, group in runs:
            result = run_one(workload, config, tick)
            scores = ", ".join(f"{k} {v:.3f}" for k, v in result.scores[-1].items())
            progress.console.print(
                f"{config.strategy:>8} · {'/'.join(group)} · seed {config.seed}: {scores} ({result.wall_seconds:.0f} s)"
            )
            for distribution in group:
                copy = RunResult(**{**asdict(result), "distribution": distribution, "shared_with": group[1:] and group})
                results.append(copy)
                if on_result is not None:
                    on_result(copy)
    return results


def progress_bar(console: Console) -> Progress:
    """The experiments' progress display: what, a bar, done of total, elapsed and remaining time."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
