"""`flexlora sim`: experiments that compare FlexLoRA with its peers (linear benchmark, real LM) and load runs at
the paper's scale; each writes JSON, a markdown table and a PNG. Heavy imports wait until a command runs."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from aggregator.registry import STRATEGIES
from schemas.recipe import DEFAULT_RECIPE, SCALINGS, SCHEDULES, Recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
out_console = Console()

Distributions = Annotated[
    list[str] | None,
    typer.Option("--distribution", help="uniform, heavy-tail-light, heavy-tail-strong or normal; repeatable"),
]
Strategies = Annotated[
    list[str] | None,
    typer.Option(
        "--strategy",
        help="a registered strategy (flexlora, fedit, hetlora, flora, …); a single-rank one (fedit) holds every "
        "client at the lowest tier, its -top variant (fedit-top) at the top tier: the upper bound of every device "
        "being strong; repeatable (default: every registered strategy)",
    ),
]
Seeds = Annotated[list[int] | None, typer.Option("--seed", help="repeat for several seeds")]
Ranks = Annotated[str | None, typer.Option(help="the three tiers' ranks, e.g. 2,8,56 (default: scaled to the model)")]
BrokerUrl = Annotated[
    str, typer.Option(help="memory:// (embedded), amqp://… (RabbitMQ), or direct:// (strategies called in-process)")
]
RedisUrl = Annotated[str, typer.Option(help="memory:// (embedded) or redis://…")]
OutDir = Annotated[Path, typer.Option(help="folder for <name>.json, <name>.md and <name>.png")]

ALL_STRATEGIES = list(STRATEGIES)  # the registered ones; the -top variants only when asked for
DEFAULT_DISTRIBUTIONS = ["uniform", "heavy-tail-light", "heavy-tail-strong"]


def _command() -> str:
    return "flexlora " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _tiers(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        tiers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"--ranks must be comma-separated integers, got {text!r}") from exc
    if len(tiers) != 3 or min(tiers) < 1:
        raise typer.BadParameter(f"--ranks needs three positive ranks (low, middle, high tier), got {text!r}")
    return tiers


def _run_matrix(
    workload: Any,
    *,
    name: str,
    title: str,
    out: Path,
    strategies: list[str],
    distributions: list[str],
    seeds: list[int],
    settings: dict[str, Any],
    **run: Any,
) -> None:
    from experiments.report import write_results
    from experiments.runner import RunConfig, plan, run_all

    try:
        runs = plan(strategies, distributions, seeds, RunConfig(strategy="", distribution="", **run))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    done: list[Any] = []

    def write(result: Any = None) -> tuple[Path, Path, Path]:
        # Rewritten after every run, so a long experiment that is stopped early keeps what it measured.
        if result is not None:
            done.append(result)
        return write_results(
            done,
            out,
            name,
            metrics=workload.metrics,
            higher_is_better=workload.higher_is_better,
            settings={**settings, **{k: v for k, v in run.items() if k != "broker_url"}, "seeds": seeds},
            command=_command(),
            title=title,
        )

    def record(result: Any) -> None:
        write(result)

    run_all(workload, runs, on_result=record)
    paths = write()
    out_console.print(paths[1].read_text())
    for path in paths:
        typer.echo(str(path))


ServerLr = Annotated[
    float,
    typer.Option(min=0.01, help="server learning rate of the -carry strategies"),
]


def _server_step(server_lr: float) -> dict[str, float]:
    """Run settings for the server step: recorded only when not the default, so runs made before the option
    existed still merge with runs made after it."""
    return {} if server_lr == 1.0 else {"server_lr": server_lr}


@app.command()
def linear(
    distribution: Distributions = None,
    strategy: Strategies = None,
    seed: Seeds = None,
    ranks: Ranks = None,
    clients: Annotated[int, typer.Option(min=1, help="clients, one task each")] = 40,
    per_round: Annotated[int, typer.Option(min=1)] = 10,
    rounds: Annotated[int, typer.Option(min=1)] = 10,
    server_lr: ServerLr = 1.0,
    dp_clip_norm: Annotated[
        float | None, typer.Option(help="differential privacy: clip each client's change to this norm")
    ] = None,
    dp_noise_multiplier: Annotated[
        float | None, typer.Option(help="differential privacy: noise std on the round's sum, × clip norm")
    ] = None,
    broker_url: BrokerUrl = "direct://",
    redis_url: RedisUrl = "memory://",
    out: OutDir = Path("docs/experiments"),
    name: Annotated[str, typer.Option(help="file name stem of the results")] = "linear",
) -> None:
    """Synthetic linear benchmark (seconds): relative error of the global update on unseen tasks, lower is better."""
    from experiments.linear import LinearConfig, LinearWorkload

    workload = LinearWorkload(LinearConfig(seen_tasks=clients))
    tiers = _tiers(ranks, (2, 8, 24))
    _run_matrix(
        workload,
        name=name,
        title=f"Linear benchmark: relative error of the global update ({clients} clients, {per_round} per round)",
        out=out,
        strategies=strategy or ALL_STRATEGIES,
        distributions=distribution or DEFAULT_DISTRIBUTIONS,
        seeds=seed or [0],
        settings={"workload": "linear", **vars(workload.config)},
        tiers=tiers,
        clients=clients,
        per_round=per_round,
        rounds=rounds,
        broker_url=broker_url,
        redis_url=redis_url,
        **_server_step(server_lr),
        **_privacy(dp_clip_norm, dp_noise_multiplier),
    )


def _privacy(clip_norm: float | None, noise_multiplier: float | None) -> dict[str, float]:
    """Run settings for differential privacy: both or neither; recorded only when given."""
    if (clip_norm is None) != (noise_multiplier is None):
        raise typer.BadParameter("give --dp-clip-norm and --dp-noise-multiplier together")
    if clip_norm is None or noise_multiplier is None:
        return {}
    return {"dp_clip_norm": clip_norm, "dp_noise_multiplier": noise_multiplier}


@app.command()
def lm(
    distribution: Distributions = None,
    strategy: Strategies = None,
    seed: Seeds = None,
    ranks: Ranks = None,
    model: Annotated[str, typer.Option(help="smollm2 (bundled) or tiny")] = "smollm2",
    clients: Annotated[int, typer.Option(min=1, help="clients, one procedural task each")] = 20,
    unseen_tasks: Annotated[int, typer.Option(min=1, help="built-in tasks no client holds")] = 7,
    tasks_per_client: Annotated[int, typer.Option(min=1, help="seen tasks each client holds (non-IID)")] = 1,
    per_round: Annotated[int, typer.Option(min=1)] = 4,
    rounds: Annotated[int, typer.Option(min=1)] = 4,
    local_steps: Annotated[int, typer.Option(min=1)] = 8,
    batch_size: Annotated[int, typer.Option(min=1, help="examples per local step")] = 8,
    samples_per_task: Annotated[int, typer.Option(min=1)] = 32,
    learning_rate: Annotated[float, typer.Option(min=0.0)] = DEFAULT_RECIPE.learning_rate,
    scaling: Annotated[
        str, typer.Option(help=f"LoRA scaling convention: {', '.join(SCALINGS)}")
    ] = DEFAULT_RECIPE.scaling,
    alpha_factor: Annotated[float | None, typer.Option(help="alpha = factor · rank^exponent")] = None,
    schedule: Annotated[str, typer.Option(help=f"local learning-rate schedule: {', '.join(SCHEDULES)}")] = (
        DEFAULT_RECIPE.schedule
    ),
    warmup_steps: Annotated[int, typer.Option(min=0)] = DEFAULT_RECIPE.warmup_steps,
    eval_unseen: Annotated[int, typer.Option(min=1, help="held-out examples per unseen task")] = 4,
    eval_seen: Annotated[int, typer.Option(min=1, help="held-out examples per seen task")] = 2,
    generate: Annotated[
        bool, typer.Option(help="score generated answers (ROUGE-L); --no-generate: teacher-forced scores only")
    ] = True,
    generate_every: Annotated[
        int, typer.Option(min=1, help="generate after every this many rounds (always the base and the last)")
    ] = 1,
    server_lr: ServerLr = 1.0,
    broker_url: BrokerUrl = "memory://",
    redis_url: RedisUrl = "memory://",
    out: OutDir = Path("docs/experiments"),
    name: Annotated[str, typer.Option(help="file name stem of the results")] = "smollm2",
) -> None:
    """Real LM: clients fine-tune LoRA on one procedural task each; global ROUGE-L on unseen and seen tasks."""
    from dataclasses import asdict

    from edge_client.model import load_base_model
    from experiments.lm import LmConfig, LmWorkload
    from experiments.ranks import scaled_ranks

    try:
        recipe = Recipe(
            scaling=scaling,  # type: ignore[arg-type]
            alpha_factor=alpha_factor,
            learning_rate=learning_rate,
            schedule=schedule,  # type: ignore[arg-type]
            warmup_steps=warmup_steps,
        )
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    with Console(stderr=True).status(f"loading {model}…"):
        base = load_base_model(model)
    tiers = _tiers(ranks, scaled_ranks(int(base.model.config.hidden_size)))
    config = LmConfig(
        clients=clients,
        unseen_tasks=unseen_tasks,
        tasks_per_client=tasks_per_client,
        samples_per_task=samples_per_task,
        local_steps=local_steps,
        batch_size=batch_size,
        recipe=recipe,
        eval_unseen_per_task=eval_unseen,
        eval_seen_per_task=eval_seen,
        generate=generate,
        generate_every=generate_every,
    )
    seen, unseen = config.split()
    workload = LmWorkload(base, config, tiers)
    _run_matrix(
        workload,
        name=name,
        title=f"{base.name}: global ROUGE-L ({clients} clients, {per_round} per round, ranks {list(tiers)})",
        out=out,
        strategies=strategy or ALL_STRATEGIES,
        distributions=distribution or DEFAULT_DISTRIBUTIONS,
        seeds=seed or [0],
        settings={
            "workload": "lm",
            "model": base.name,
            **asdict(config),
            "recipe": recipe.model_dump(),
            "seen": seen,
            "unseen": unseen,
        },
        tiers=tiers,
        clients=clients,
        per_round=per_round,
        rounds=rounds,
        broker_url=broker_url,
        redis_url=redis_url,
        **_server_step(server_lr),
    )


@app.command()
def load(
    clients: Annotated[int, typer.Option(min=1)] = 1613,
    per_round: Annotated[int, typer.Option(min=1)] = 80,
    rounds: Annotated[int, typer.Option(min=1)] = 50,
    distribution: Annotated[str, typer.Option(help="rank distribution of the clients")] = "heavy-tail-strong",
    ranks: Ranks = None,
    layers: Annotated[int, typer.Option(min=1, help="layers of SmolLM2-135M q/v shapes per update")] = 30,
    svd_mode: Annotated[str, typer.Option(help="exact or fast")] = "exact",
    broker_url: Annotated[str, typer.Option(help="memory:// (embedded) or amqp://…")] = "memory://",
    redis_url: RedisUrl = "memory://",
    publishers: Annotated[int, typer.Option(min=1, help="connections publishing (and receiving) side by side")] = 4,
    raw_every: Annotated[
        int, typer.Option(min=0, help="measure raw pika on the same bytes on round 1 and every N-th (0: never)")
    ] = 10,
    hold_bytes: Annotated[
        int | None, typer.Option(min=0, help="the aggregator's hold_bytes (0: read every update back from the store)")
    ] = None,
    aggregators: Annotated[
        int, typer.Option(min=0, help="flexlora aggregator processes (0: one aggregator on a thread of this process)")
    ] = 0,
    payload_store: Annotated[
        str, typer.Option(help="the aggregators' payload_store: redis, or file:///dir (update bytes out of Redis)")
    ] = "redis",
    fold_bytes: Annotated[
        int | None, typer.Option(min=0, help="the aggregators' fold_bytes (0: sum every update at close)")
    ] = None,
    out: OutDir = Path("docs/experiments"),
    name: Annotated[str, typer.Option(help="file name stem of the results")] = "load",
) -> None:
    """Synthetic-update clients (real shapes, no training) through the aggregator; per-round turnaround, memory,
    and the raw-pika floor for the same bytes."""
    import json

    from experiments.load import LoadConfig, markdown, run_load
    from experiments.ranks import DISTRIBUTIONS

    if distribution not in DISTRIBUTIONS:
        raise typer.BadParameter(f"unknown distribution {distribution!r}; choose from {', '.join(DISTRIBUTIONS)}")
    if svd_mode not in ("exact", "fast"):
        raise typer.BadParameter("--svd-mode is exact or fast")
    if per_round > clients:
        raise typer.BadParameter("--per-round cannot exceed --clients")
    config = LoadConfig(
        clients=clients,
        per_round=per_round,
        rounds=rounds,
        distribution=distribution,
        tiers=_tiers(ranks, LoadConfig().tiers),
        layers=layers,
        svd_mode="fast" if svd_mode == "fast" else "exact",
        broker_url=broker_url,
        redis_url=redis_url,
        publishers=publishers,
        raw_every=raw_every,
        hold_bytes=hold_bytes,
        aggregators=aggregators,
        payload_store=payload_store,
        fold_bytes=fold_bytes,
    )
    if aggregators and broker_url.startswith("memory://"):
        raise typer.BadParameter("--aggregators needs --broker-url amqp://… and --redis-url redis://…")
    report = run_load(config)
    table = markdown(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"command": _command(), **report.to_json()}, indent=2) + "\n")
    (out / f"{name}.md").write_text(f"```\n{_command()}\n```\n\n{table}\n")
    out_console.print(table)
    typer.echo(str(out / f"{name}.json"))


@app.command()
def merge(
    inputs: Annotated[list[Path], typer.Argument(help="result JSON files of one experiment, e.g. one per seed")],
    out: OutDir = Path("docs/experiments"),
    name: Annotated[str, typer.Option(help="file name stem of the merged results")] = "merged",
    title: Annotated[str | None, typer.Option(help="title of the table and plot (default: the first input's)")] = None,
) -> None:
    """Combine runs made by separate commands (e.g. one per seed, run side by side) into one table and plot;
    the inputs must share their settings but for the seeds."""
    import json

    from experiments.report import write_results
    from experiments.runner import RunResult

    documents = []
    for path in inputs:
        try:
            documents.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"{path}: {exc}") from exc
    first = documents[0]

    def comparable(document: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in document["settings"].items() if k != "seeds"}

    for path, document in zip(inputs, documents, strict=True):
        if comparable(document) != comparable(first) or document["metrics"] != first["metrics"]:
            raise typer.BadParameter(f"{path} was run with other settings than {inputs[0]}; only seeds may differ")
    runs = []
    for document in documents:
        for run in document["runs"]:
            run = {**run, "ranks": {int(k): v for k, v in run["ranks"].items()}}
            runs.append(RunResult(**run))
    keys = [(r.strategy, r.distribution, r.seed) for r in runs]
    if len(set(keys)) != len(keys):
        raise typer.BadParameter("the inputs hold the same (strategy, distribution, seed) more than once")
    seeds = sorted({s for d in documents for s in d["settings"]["seeds"]})
    first_md = inputs[0].with_suffix(".md")
    default_title = first_md.read_text().split("\n", 1)[0] if first_md.exists() else "merged results"
    commands = "\n".join(d["command"] for d in documents) + "\n" + _command()
    paths = write_results(
        runs,
        out,
        name,
        metrics=first["metrics"],
        higher_is_better=first["higher_is_better"],
        settings={**comparable(first), "seeds": seeds},
        command=commands,
        title=title or default_title,
    )
    out_console.print(paths[1].read_text())
