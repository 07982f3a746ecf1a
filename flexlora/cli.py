"""The `flexlora` command: each role imports only its own package, so devices need no server code."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler

from aggregator.registry import SERVICE_STRATEGIES, STRATEGIES
from flexlora.provision import provision, server_certs

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger, message (and the error, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


NOISY_LOGGERS = ("pika",)
# The services' log options, flags and FLEXLORA_LOG_FORMAT / FLEXLORA_VERBOSE (compose sets them per service).
LogFormat = Annotated[
    str, typer.Option(envvar="FLEXLORA_LOG_FORMAT", help="rich (terminal) or json (one object per line)")
]
Verbose = Annotated[bool, typer.Option("--verbose/--quiet", envvar="FLEXLORA_VERBOSE")]


def _logging(verbose: bool, log_format: str = "rich") -> None:
    handler: logging.Handler
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
    else:
        handler = RichHandler(console=console, show_path=False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", handlers=[handler])
    # pika logs every step of every connection and channel at INFO, and each refused connection as a dozen ERROR
    # lines with a traceback (an aggregator waiting for a broker printed 70 lines a retry). What pika reports
    # reaches the user through our own errors and their one line each (broker.transports.rabbitmq).
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _given(**values: Any) -> dict[str, Any]:
    """Flags the user actually passed; the rest come from FLEXLORA_* variables or the defaults."""
    return {k: v for k, v in values.items() if v is not None and v != ()}


def explain(exc: BaseException) -> str | None:
    """One line for an error a user can act on (a service unreachable or refusing, a port taken, a bad
    variable), instead of a traceback; None for anything else, which is a bug and keeps its traceback."""
    import errno
    import sys

    import redis
    from pydantic_settings import SettingsError

    from broker.errors import BrokerError, ConnectionLost

    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return f"cannot reach Redis: {exc}"
    if isinstance(exc, ConnectionLost):
        return str(exc)
    if isinstance(exc, BrokerError):
        hint = ""
        if "NOT_FOUND - no exchange" in str(exc):
            hint = " (no aggregator has declared this federation yet: start one, or check --federation)"
        return f"the broker refused: {exc}{hint}"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"{exc.strerror}: is the --metrics-port in use by another process?"
    worker = sys.modules.get("edge_client.worker")  # loaded if it raised: a client's own ends
    if worker is not None and isinstance(exc, (worker.UpdateRefused, worker.AdapterTimeout)):
        return str(exc)
    if isinstance(exc, SettingsError):
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        return f"invalid setting in the environment: {exc}{cause}"
    return None


def _settings_error(exc: ValidationError) -> typer.Exit:
    for err in exc.errors():
        console.print(f"[red]invalid setting[/] {'.'.join(map(str, err['loc']))}: {err['msg']}")
    return typer.Exit(code=2)


@app.command()
def aggregator(
    broker_url: Annotated[str | None, typer.Option(help="amqp://user:pass@host:port/vhost")] = None,
    redis_url: Annotated[str | None, typer.Option(help="redis://host:port/db")] = None,
    tls_ca_file: Annotated[str | None, typer.Option(help="CA (PEM) that signs the servers' certificates")] = None,
    tls_cert_file: Annotated[str | None, typer.Option(help="this process's certificate (PEM): mutual TLS")] = None,
    tls_key_file: Annotated[str | None, typer.Option(help="its private key (PEM), unless in the cert file")] = None,
    federation: Annotated[str | None, typer.Option(help="namespace of queues and Redis keys")] = None,
    max_updates: Annotated[int | None, typer.Option(help="close a round at this many updates")] = None,
    min_updates: Annotated[int | None, typer.Option(help="fewest updates a deadline may close a round with")] = None,
    round_deadline_s: Annotated[
        float | None, typer.Option(help="close after this long once min_updates are in")
    ] = None,
    lease_s: Annotated[
        float | None, typer.Option(help="finalising lease; another aggregator takes over after it")
    ] = None,
    prefetch: Annotated[int | None, typer.Option(help="unacked updates held at once")] = None,
    strategy: Annotated[str | None, typer.Option(help=f"{', '.join(SERVICE_STRATEGIES)} (default flexlora)")] = None,
    svd_mode: Annotated[
        str | None, typer.Option(help="exact (default) or fast (float32 products, certified top-r eigenpairs)")
    ] = None,
    weighting: Annotated[str | None, typer.Option(help="data_size (default), uniform or staleness")] = None,
    staleness_exponent: Annotated[float | None, typer.Option(help="a in (1 + staleness)^-a")] = None,
    max_staleness: Annotated[int | None, typer.Option(help="dead-letter updates more versions behind")] = None,
    keep_versions: Annotated[int | None, typer.Option(help="versions whose updates and adapters are kept")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port")] = None,
    chunk_bytes: Annotated[int | None, typer.Option(help="adapters larger than this go in chunks")] = None,
    max_update_bytes: Annotated[int | None, typer.Option(help="refuse updates larger than this")] = None,
    transfer_expiry_s: Annotated[
        float | None, typer.Option(help="drop a chunked update idle this long (reported, not counted)")
    ] = None,
    hold_bytes: Annotated[
        int | None, typer.Option(help="bytes of recorded updates kept decoded for the rounds this process closes")
    ] = None,
    fold_bytes: Annotated[
        int | None, typer.Option(help="bytes of dense round sums recorded updates are folded into (0: none)")
    ] = None,
    payload_store: Annotated[
        str | None,
        typer.Option(help="where update bytes live: redis (default) or file:///dir on a mount all aggregators share"),
    ] = None,
    payload_fsync: Annotated[
        bool | None, typer.Option(help="file:// payloads reach the disk before an update is acked (default on)")
    ] = None,
    heartbeat_s: Annotated[int | None, typer.Option(help="AMQP heartbeat in seconds")] = None,
    min_replicas: Annotated[
        int | None, typer.Option(help="ack an update only once this many Redis replicas hold its record (WAIT)")
    ] = None,
    replica_timeout_s: Annotated[float | None, typer.Option(help="how long to wait for them before retrying")] = None,
    min_rank: Annotated[int | None, typer.Option(help="refuse updates (and joins) below this rank")] = None,
    max_rank: Annotated[int | None, typer.Option(help="refuse updates (and joins) above this rank")] = None,
    max_update_norm: Annotated[float | None, typer.Option(help="refuse updates whose ‖ΔW‖_F exceeds this")] = None,
    norm_outlier_factor: Annotated[
        float | None, typer.Option(help="refuse updates whose ‖ΔW‖_F exceeds this times the open round's median")
    ] = None,
    max_weight_share: Annotated[float | None, typer.Option(help="cap on one client's share of a round")] = None,
    max_transfers_per_client: Annotated[int | None, typer.Option(help="chunked updates under way per client")] = None,
    max_transfers: Annotated[int | None, typer.Option(help="chunked updates under way in the federation")] = None,
    carry_residual: Annotated[
        bool | None,
        typer.Option(help="average the clients' changes, keeping what a low-rank client cannot hold (flexlora)"),
    ] = None,
    server_lr: Annotated[
        float | None, typer.Option(help="server learning rate on the changes (carry-residual)")
    ] = None,
    global_rank: Annotated[
        int | None, typer.Option(help="rank the global adapter is kept (and a joining client is cut) at (flexlora)")
    ] = None,
    dp_clip_norm: Annotated[
        float | None, typer.Option(help="differential privacy: clip each client's change to this Frobenius norm")
    ] = None,
    dp_noise_multiplier: Annotated[
        float | None, typer.Option(help="differential privacy: Gaussian noise std on the round's sum, × clip norm")
    ] = None,
    dp_population: Annotated[
        int | None, typer.Option(help="differential privacy: clients in the federation (the sampling rate)")
    ] = None,
    dp_delta: Annotated[float | None, typer.Option(help="differential privacy: the δ ε is reported at")] = None,
    dp_epsilon_budget: Annotated[
        float | None, typer.Option(help="differential privacy: refuse to commit a round past this ε")
    ] = None,
    dp_weight_cap: Annotated[
        int | None, typer.Option(help="differential privacy: a client weighs min(samples / cap, 1)")
    ] = None,
    require_identity: Annotated[
        bool | None, typer.Option(help="senders must be the broker user provisioned for the client they name")
    ] = None,
    signing_keys: Annotated[
        str | None, typer.Option(help="JSON file of client id -> hex HMAC key; signatures then required")
    ] = None,
    scaling: Annotated[str | None, typer.Option(help="LoRA scaling: rslora (default), rank or fixed")] = None,
    alpha_factor: Annotated[float | None, typer.Option(help="alpha = factor · rank^exponent of the scaling")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="peak learning rate of a local run")] = None,
    schedule: Annotated[str | None, typer.Option(help="local schedule: linear (default), constant, cosine")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="linear warm-up steps of a local run")] = None,
    check: Annotated[
        bool, typer.Option("--check", help="exit 0 if an aggregator of this federation is alive on this host")
    ] = False,
    log_format: LogFormat = "rich",
    verbose: Verbose = True,
) -> None:
    """Consume updates into rounds, run FlexLoRA, publish an adapter to every participant at its rank."""
    from aggregator.app import run_aggregator
    from aggregator.settings import AggregatorSettings

    _logging(verbose, log_format)
    try:
        settings = AggregatorSettings(
            **_given(
                broker_url=broker_url,
                redis_url=redis_url,
                tls_ca_file=tls_ca_file,
                tls_cert_file=tls_cert_file,
                tls_key_file=tls_key_file,
                federation=federation,
                max_updates=max_updates,
                min_updates=min_updates,
                round_deadline_s=round_deadline_s,
                lease_s=lease_s,
                prefetch=prefetch,
                strategy=strategy,
                svd_mode=svd_mode,
                weighting=weighting,
                staleness_exponent=staleness_exponent,
                max_staleness=max_staleness,
                keep_versions=keep_versions,
                metrics_port=metrics_port,
                chunk_bytes=chunk_bytes,
                max_update_bytes=max_update_bytes,
                transfer_expiry_s=transfer_expiry_s,
                hold_bytes=hold_bytes,
                fold_bytes=fold_bytes,
                payload_store=payload_store,
                payload_fsync=payload_fsync,
                heartbeat_s=heartbeat_s,
                min_replicas=min_replicas,
                replica_timeout_s=replica_timeout_s,
                min_rank=min_rank,
                max_rank=max_rank,
                max_update_norm=max_update_norm,
                norm_outlier_factor=norm_outlier_factor,
                max_weight_share=max_weight_share,
                max_transfers_per_client=max_transfers_per_client,
                max_transfers=max_transfers,
                carry_residual=carry_residual,
                server_lr=server_lr,
                global_rank=global_rank,
                dp_clip_norm=dp_clip_norm,
                dp_noise_multiplier=dp_noise_multiplier,
                dp_population=dp_population,
                dp_delta=dp_delta,
                dp_epsilon_budget=dp_epsilon_budget,
                dp_weight_cap=dp_weight_cap,
                require_identity=require_identity,
                signing_keys=signing_keys,
                scaling=scaling,
                alpha_factor=alpha_factor,
                learning_rate=learning_rate,
                schedule=schedule,
                warmup_steps=warmup_steps,
            )
        )
    except ValidationError as exc:
        raise _settings_error(exc) from exc
    if check:
        import socket

        from aggregator.app import check_health

        alive, owners = check_health(settings, host=socket.gethostname())
        console.print(f"{'alive' if alive else 'no live aggregator'}: {', '.join(owners) or '-'}")
        raise typer.Exit(code=0 if alive else 1)
    from aggregator.payloads import PayloadStoreMismatch

    try:
        run_aggregator(settings)
    except PayloadStoreMismatch as exc:
        console.print(f"[red]cannot start:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from exc


@app.command()
def client(
    client_id: Annotated[str | None, typer.Option(help="this device's id (unique in the federation)")] = None,
    broker_url: Annotated[str | None, typer.Option(help="amqp://user:pass@host:port/vhost")] = None,
    tls_ca_file: Annotated[str | None, typer.Option(help="CA (PEM) that signs the servers' certificates")] = None,
    tls_cert_file: Annotated[str | None, typer.Option(help="this process's certificate (PEM): mutual TLS")] = None,
    tls_key_file: Annotated[str | None, typer.Option(help="its private key (PEM), unless in the cert file")] = None,
    federation: Annotated[
        str | None, typer.Option(help="the federation to join (its aggregators' --federation)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="smollm2 (bundled), tiny, a model directory or a .gguf")] = None,
    rank: Annotated[
        str | None, typer.Option(help="LoRA rank this device trains at, or auto (measured before every round)")
    ] = None,
    rank_schedule: Annotated[
        str | None, typer.Option(help="a rank per round, e.g. 8,16,32 (the last holds); overrides --rank")
    ] = None,
    rank_pattern: Annotated[
        str | None,
        typer.Option(
            help="ranks per module, e.g. q_proj=30,gate_proj=200, or paper-type2 (30 on attention, 200 on the MLP); "
            "the other modules train at --rank"
        ),
    ] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: the recipe's for the rank)")] = None,
    target_module: Annotated[list[str] | None, typer.Option(help="module to adapt; repeat for several")] = None,
    task: Annotated[list[str] | None, typer.Option(help="built-in task for local data; repeat for several")] = None,
    data: Annotated[str | None, typer.Option(help="JSONL with instruction/input/output (Alpaca, Dolly, NI)")] = None,
    samples_per_task: Annotated[
        int | None, typer.Option(help="built-in task examples this device holds per task")
    ] = None,
    local_steps: Annotated[int | None, typer.Option(help="training steps per round")] = None,
    batch_size: Annotated[int | None, typer.Option(help="examples per local step")] = None,
    scaling: Annotated[str | None, typer.Option(help="LoRA scaling: rslora (default), rank or fixed")] = None,
    alpha_factor: Annotated[float | None, typer.Option(help="alpha = factor · rank^exponent of the scaling")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="peak learning rate of a local run")] = None,
    schedule: Annotated[str | None, typer.Option(help="local schedule: linear (default), constant, cosine")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="linear warm-up steps of a local run")] = None,
    seed: Annotated[int | None, typer.Option(help="seeds the data draw, the LoRA init and the batches")] = None,
    rounds: Annotated[int | None, typer.Option(help="stop after this many rounds (0 = run until stopped)")] = None,
    heartbeat_s: Annotated[int | None, typer.Option(help="AMQP heartbeat in seconds")] = None,
    adapter_timeout_s: Annotated[float | None, typer.Option(help="how long to wait for a round's adapter")] = None,
    chunk_bytes: Annotated[int | None, typer.Option(help="updates larger than this go in chunks")] = None,
    state_dir: Annotated[str | None, typer.Option(help="checkpoint folder (default: under the cache)")] = None,
    eval_examples: Annotated[
        int | None, typer.Option(help="held-out examples scored (ROUGE-L) each round and reported (0 = off)")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port")] = None,
    log_format: LogFormat = "rich",
    verbose: Verbose = True,
) -> None:
    """Train a LoRA adapter locally at this device's rank and federate it round after round."""
    from edge_client.app import run_client
    from edge_client.settings import ClientSettings

    _logging(verbose, log_format)
    try:
        settings = ClientSettings(
            **_given(
                client_id=client_id,
                broker_url=broker_url,
                tls_ca_file=tls_ca_file,
                tls_cert_file=tls_cert_file,
                tls_key_file=tls_key_file,
                federation=federation,
                model=model,
                rank=rank,
                rank_schedule=rank_schedule,
                rank_pattern=rank_pattern,
                lora_alpha=lora_alpha,
                target_modules=tuple(target_module or ()),
                tasks=tuple(task or ()),
                data=data,
                samples_per_task=samples_per_task,
                local_steps=local_steps,
                batch_size=batch_size,
                scaling=scaling,
                alpha_factor=alpha_factor,
                learning_rate=learning_rate,
                schedule=schedule,
                warmup_steps=warmup_steps,
                seed=seed,
                rounds=rounds,
                heartbeat_s=heartbeat_s,
                adapter_timeout_s=adapter_timeout_s,
                chunk_bytes=chunk_bytes,
                state_dir=state_dir,
                eval_examples=eval_examples,
                metrics_port=metrics_port,
            )
        )
    except ValidationError as exc:
        raise _settings_error(exc) from exc
    from edge_client.datasets import DataError

    try:
        done = run_client(settings, progress=log_format == "rich" and console.is_terminal)
    except DataError as exc:
        console.print(f"[red]cannot start:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from exc
    console.print(f"{settings.client_id}: {done} rounds completed")


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="smollm2 (bundled) or tiny")] = "smollm2",
    rounds: Annotated[int, typer.Option(min=1)] = 3,
    rank: Annotated[list[int] | None, typer.Option(help="one client per --rank (default 4 8 16 8)")] = None,
    local_steps: Annotated[int, typer.Option(min=1)] = 10,
    broker_url: Annotated[str, typer.Option(help="memory:// (embedded) or amqp://…")] = "memory://",
    redis_url: Annotated[str, typer.Option(help="memory:// (embedded) or redis://…")] = "memory://",
    verbose: Annotated[bool, typer.Option("--verbose/--quiet")] = False,
) -> None:
    """Run a small heterogeneous-rank federation and print the global model's held-out score every round."""
    from flexlora.demo import DEFAULT_RANKS, DemoConfig, run_demo

    _logging(verbose)
    out = Console()
    config = DemoConfig(
        model=model,
        rounds=rounds,
        ranks=tuple(rank or DEFAULT_RANKS),
        local_steps=local_steps,
        broker_url=broker_url,
        redis_url=redis_url,
    )
    if len(config.ranks) < 1:
        raise typer.BadParameter("give at least one --rank")
    run_demo(config, out)
    if broker_url.startswith("memory://"):
        out.print(
            "\nThat ran on the embedded in-memory broker and round store. The same federation over the real\n"
            "RabbitMQ and Redis:  [bold].venv/bin/flexlora demo --broker-url amqp://guest:guest@127.0.0.1:5672/%2F "
            "--redis-url redis://127.0.0.1:6379/0[/]\n"
            "or as separate processes: `flexlora aggregator` and one `flexlora client --client-id … --rank …` per "
            "device (see README)."
        )


@app.command()
def aggregate(
    adapter_dir: Annotated[list[str], typer.Argument(help="PEFT LoRA adapter directories (adapter_config.json)")],
    rank: Annotated[list[int], typer.Option(help="rank to write an adapter at; repeat for several")],
    out: Annotated[str, typer.Option(help="directory to write rank-<r>/ adapters and aggregation.json into")],
    strategy: Annotated[str, typer.Option(help=", ".join(STRATEGIES))] = "flexlora",
    weights: Annotated[str | None, typer.Option(help="client weights w1,w2,… (normalised)")] = None,
    samples: Annotated[str | None, typer.Option(help="client sample counts n1,n2,… (data-size weights)")] = None,
    alpha: Annotated[float | None, typer.Option(help="lora_alpha of the outputs (default 2·rank)")] = None,
    rank_pattern: Annotated[
        str | None,
        typer.Option(help="ranks per module of the outputs, e.g. q_proj=30,gate_proj=200 or paper-type2"),
    ] = None,
) -> None:
    """Aggregate PEFT adapter directories offline and write one PEFT adapter per requested rank."""
    from pathlib import Path

    from rich.markup import escape

    from flexlora.aggregate import aggregate_dirs
    from schemas.ranks import parse_rank_pattern

    def numbers(flag: str, text: str | None, kind: type[float] | type[int]) -> list[Any] | None:
        if text is None:
            return None
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError as exc:
            raise ValueError(f"--{flag} must be a comma-separated list of numbers, got {text!r}") from exc

    try:
        written = aggregate_dirs(
            [Path(d) for d in adapter_dir],
            rank,
            Path(out),
            strategy=strategy,
            weights=numbers("weights", weights, float),
            samples=numbers("samples", samples, int),
            alpha=alpha,
            rank_pattern=parse_rank_pattern(rank_pattern or ""),
        )
    except (ValueError, OSError) as exc:  # AdapterFileError and StrategyError are ValueErrors
        console.print(f"[red]cannot aggregate:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from exc
    for directory in written:
        typer.echo(str(directory))
    if any(d.name.startswith("stacked-") for d in written):
        console.print("FLoRA: clients merge this stacked adapter into their base weights and start a fresh LoRA.")


@app.command()
def export(
    out: Annotated[str, typer.Option(help="directory to write the PEFT adapter into")],
    federation: Annotated[str | None, typer.Option(help="namespace of queues and Redis keys")] = None,
    redis_url: Annotated[str | None, typer.Option(help="the federation's round store")] = None,
    version: Annotated[int | None, typer.Option(help="global version (default: the newest)")] = None,
    client_id: Annotated[str | None, typer.Option(help="export this client's release")] = None,
    rank: Annotated[int | None, typer.Option(help="export a release at this rank (default: the largest)")] = None,
    payload_store: Annotated[
        str | None, typer.Option(help="the aggregators' payload_store (redis or file:///dir)")
    ] = None,
) -> None:
    """Write a global version's adapter as a PEFT directory that PeftModel.from_pretrained loads."""
    from pathlib import Path

    from aggregator.payloads import open_payloads
    from aggregator.stores import open_store
    from flexlora.aggregate import export_release

    settings = _read_settings(None, redis_url, federation, payload_store=payload_store)
    payloads = open_payloads(settings.payload_store, settings.federation)
    store = open_store(settings.redis_url, settings.federation, tls=settings.tls_files(), payloads=payloads)
    try:
        path, header = export_release(store, Path(out), version=version, client_id=client_id, rank=rank)
    except ValueError as exc:
        where = f"federation {settings.federation!r}"
        console.print(f"[red]cannot export {where}:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"{path}: version {header.version}, rank {header.rank}, alpha {header.lora_alpha}")


def _read_settings(broker_url: str | None, redis_url: str | None, federation: str | None, **more: Any) -> Any:
    """Where a federation lives, from flags or FLEXLORA_* variables (the aggregator's names and defaults)."""
    from aggregator.settings import AggregatorSettings

    try:
        given = _given(broker_url=broker_url, redis_url=redis_url, federation=federation, **more)
        return AggregatorSettings(**given)
    except ValidationError as exc:
        raise _settings_error(exc) from exc


@app.command()
def status(
    federation: Annotated[str | None, typer.Option(help="namespace of queues and Redis keys")] = None,
    broker_url: Annotated[str | None, typer.Option(help="amqp://user:pass@host:port/vhost")] = None,
    redis_url: Annotated[str | None, typer.Option(help="redis://host:port/db")] = None,
    rounds: Annotated[int, typer.Option(help="how many of the last rounds to show")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON document instead of tables")] = False,
) -> None:
    """Current version, the open round's fill and deadline, live aggregators, queue depths, dead letters by
    reason and the last rounds' scores."""
    import time

    from aggregator.status import collect, render
    from aggregator.stores import open_store
    from broker.connect import connect
    from broker.errors import BrokerError

    settings = _read_settings(broker_url, redis_url, federation)
    store = open_store(settings.redis_url, settings.federation, tls=settings.tls_files())
    try:
        transport = connect(settings.broker_url, connection_name="flexlora-status", tls=settings.tls_files())
    except BrokerError as exc:
        console.print(f"[yellow]broker unreachable, queue depths left out:[/] {exc}", highlight=False)
        transport = None
    try:
        now = time.time()
        report = collect(store, transport, settings.federation, now, last_rounds=rounds)
    finally:
        if transport is not None:
            transport.close()
    if as_json:
        typer.echo(report.to_json())
    else:
        render(report, Console(), now)
    unused = not (report.version or report.open_round.updates or report.aggregators or report.refusals)
    if unused:  # a misspelt --federation shows an empty federation rather than an error: say so
        console.print(
            f"[yellow]nothing of federation {settings.federation!r} is in this store:[/] no version, update, "
            "aggregator or refusal (is --federation or FLEXLORA_FEDERATION the one the aggregators use?)",
            highlight=False,
        )


@app.command()
def history(
    out: Annotated[str, typer.Option(help="PNG file to write")] = "flexlora-history.png",
    federation: Annotated[str | None, typer.Option(help="namespace of queues and Redis keys")] = None,
    redis_url: Annotated[str | None, typer.Option(help="redis://host:port/db")] = None,
) -> None:
    """Plot the stored round history: score (mean training loss), updates and rank mix per round."""
    from pathlib import Path

    from aggregator.history_plot import plot_history
    from aggregator.stores import open_store

    settings = _read_settings(None, redis_url, federation)
    records = open_store(settings.redis_url, settings.federation, tls=settings.tls_files()).history()
    try:
        path = plot_history(records, Path(out), f"federation {settings.federation}")
    except ValueError as exc:
        console.print(f"[red]nothing to plot:[/] {exc}", highlight=False)
        raise typer.Exit(code=1) from exc
    typer.echo(f"{path}: {len(records)} rounds")


# Registered here, written in its own module (which imports its work only when it runs).
app.command()(provision)
app.command("server-certs")(server_certs)


from flexlora.sim import app as sim_app  # noqa: E402 - registered last, next to the commands above

app.add_typer(sim_app, name="sim")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
