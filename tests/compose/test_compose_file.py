"""Checks compose/ against the code (settings, commands, broker definitions, service wiring) without Docker."""

from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import importlib
import inspect
import json
import os
import queue
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import typer
import typer.core
import yaml
from pika.adapters.blocking_connection import BlockingChannel
from typer.testing import CliRunner

from aggregator.settings import AggregatorSettings
from broker.topology import ExchangeSpec, QueueSpec, Topology
from broker.transports.rabbitmq import RabbitMQTransport
from edge_client.settings import ClientSettings
from schemas.settings import ENV_PREFIX, KNOWN_NAMES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
CLIENTS = {"client-r4": ("edge-r4", 4), "client-r8": ("edge-r8", 8), "client-r16": ("edge-r16", 16)}
FLEXLORA_SERVICES = ("aggregator", "model-init", *CLIENTS)
SCRAPED_SERVICES = ("aggregator", *CLIENTS)
# The federation rabbitmq/definitions.json pre-declares: the settings' default.
FEDERATION = "default"


# --- reading the files the way compose and the image do -----------------------------------------------


def _env_lines(text: str, *, commented: bool) -> dict[str, str]:
    """KEY=VALUE lines of an env file; with `commented`, also the `# KEY=VALUE` examples."""
    pattern = re.compile(r"^(#\s*)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
    values = {}
    for line in text.splitlines():
        match = pattern.match(line.strip())
        if match and (commented or not match.group(1)):
            values[match.group(2)] = match.group(3)
    return values


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of compose's spellings (mapping or KEY=VALUE list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _dockerfile_env(dockerfile: Path) -> dict[str, str]:
    """FLEXLORA_* variables the image sets with ENV (the continuation-line form this Dockerfile uses included)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            values.update(re.findall(rf"({ENV_PREFIX}[A-Z0-9_]+)=(\S+)", line))
    return values


def password_matches(user: dict[str, Any], password: str) -> bool:
    """A definitions file's user entry has this password: rabbit_password_hashing_sha256 is
    base64(salt + sha256(salt + password)), with a 4-byte salt."""
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    raw = base64.b64decode(user["password_hash"], validate=True)
    salt, digest = raw[:4], raw[4:]
    return digest == hashlib.sha256(salt + password.encode()).digest()


def _field_names(env: dict[str, str]) -> set[str]:
    return {key[len(ENV_PREFIX) :].lower() for key in env if key.startswith(ENV_PREFIX)}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # safe_load resolves the `<<: *flexlora` merge keys, as compose does.
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = compose["services"]
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return _env_lines(ENV_EXAMPLE.read_text(), commented=False)


@pytest.fixture(scope="module")
def dockerfile(services: dict[str, dict[str, Any]]) -> Path:
    build = services["aggregator"]["build"]
    return Path(COMPOSE_DIR, build["context"], build["dockerfile"]).resolve()


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    data = json.loads((COMPOSE_DIR / "rabbitmq" / "definitions.json").read_text())
    assert isinstance(data, dict)
    return data


def _container_env(service: dict[str, Any], env_file: dict[str, str], dockerfile: Path) -> dict[str, str]:
    """What the process in the container sees: image ENV, then env_file, then `environment` (later wins)."""
    assert service.get("env_file") == ".env", "services read compose/.env, which .env.example is the model of"
    env = _dockerfile_env(dockerfile)
    env.update(env_file)
    env.update(_environment(service))
    return env


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No FLEXLORA_* variables from the machine running the tests leak into the settings under test."""
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    yield monkeypatch


# --- services and images ------------------------------------------------------------------------------


def test_every_service_is_there_with_its_image(services: dict[str, dict[str, Any]], dockerfile: Path) -> None:
    assert {"rabbitmq", "redis", *FLEXLORA_SERVICES} <= set(services)
    assert re.fullmatch(r"rabbitmq:[\w.]+-management", services["rabbitmq"]["image"])
    assert re.fullmatch(r"redis:[\w.]+", services["redis"]["image"])
    assert dockerfile == COMPOSE_DIR / "Dockerfile" and dockerfile.is_file()
    images = {services[name]["image"] for name in FLEXLORA_SERVICES}
    assert len(images) == 1, f"one project image for every role, got {images}"
    for name in FLEXLORA_SERVICES:
        assert services[name]["build"]["dockerfile"] == "compose/Dockerfile"
        assert (COMPOSE_DIR / services[name]["build"]["context"]).resolve() == ROOT


def test_the_image_entrypoint_is_the_cli_so_commands_name_a_role(
    services: dict[str, dict[str, Any]], dockerfile: Path
) -> None:
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", dockerfile.read_text(), re.MULTILINE)
    assert entrypoint and json.loads(entrypoint.group(1)) == ["flexlora"]
    group = typer.main.get_command(_cli_app())
    assert isinstance(group, typer.core.TyperGroup)
    commands = group.commands
    assert services["aggregator"]["command"] == ["aggregator"] and "aggregator" in commands
    for name in CLIENTS:
        assert services[name]["command"] == ["client"] and "client" in commands


def test_redis_keeps_an_append_only_file(services: dict[str, dict[str, Any]]) -> None:
    command = services["redis"]["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in services["redis"]["volumes"])


# --- FLEXLORA_* variables are real settings, and their values parse -----------------------------------


def test_every_flexlora_variable_is_a_setting_of_the_role_that_reads_it(
    services: dict[str, dict[str, Any]], dockerfile: Path
) -> None:
    aggregator_fields = set(AggregatorSettings.model_fields)
    client_fields = set(ClientSettings.model_fields)
    unknown = _field_names(_environment(services["aggregator"])) - aggregator_fields
    assert not unknown, f"aggregator: {sorted(unknown)} are not AggregatorSettings fields"
    for name in CLIENTS:
        unknown = _field_names(_environment(services[name])) - client_fields
        assert not unknown, f"{name}: {sorted(unknown)} are not ClientSettings fields"
    # model-init reads FLEXLORA_MODEL and the image's FLEXLORA_CACHE directly, outside the settings classes.
    for env in (_environment(services["model-init"]), _dockerfile_env(dockerfile)):
        assert _field_names(env) <= KNOWN_NAMES
    examples = _env_lines(ENV_EXAMPLE.read_text(), commented=True)
    unknown = _field_names(examples) - (aggregator_fields | client_fields | KNOWN_NAMES)
    assert not unknown, f".env.example: {sorted(unknown)} are not settings"


def test_no_value_would_be_rewritten_by_compose_interpolation() -> None:
    # Compose substitutes `$NAME` in the compose file and in env files; nothing here means one.
    assert "$" not in COMPOSE_FILE.read_text()
    examples = _env_lines(ENV_EXAMPLE.read_text(), commented=True)
    assert not [key for key, value in examples.items() if "$" in value]


@pytest.mark.parametrize("examples", [False, True], ids=["as-shipped", "with-commented-examples"])
def test_the_aggregator_settings_accept_its_container_environment(
    services: dict[str, dict[str, Any]], dockerfile: Path, isolated_env: pytest.MonkeyPatch, examples: bool
) -> None:
    env_file = _env_lines(ENV_EXAMPLE.read_text(), commented=examples)
    for key, value in _container_env(services["aggregator"], env_file, dockerfile).items():
        isolated_env.setenv(key, value)
    # Read from the environment as the container's `flexlora aggregator` does; that also runs the typo guard.
    settings = AggregatorSettings()
    assert settings.max_updates == 3
    assert settings.federation == FEDERATION
    assert settings.metrics_port == int(_environment(services["aggregator"])["FLEXLORA_METRICS_PORT"])
    assert (settings.broker_url, settings.redis_url) == (
        env_file["FLEXLORA_BROKER_URL"],
        env_file["FLEXLORA_REDIS_URL"],
    )


@pytest.mark.parametrize("service", list(CLIENTS))
@pytest.mark.parametrize("examples", [False, True], ids=["as-shipped", "with-commented-examples"])
def test_the_client_settings_accept_each_clients_container_environment(
    services: dict[str, dict[str, Any]],
    dockerfile: Path,
    isolated_env: pytest.MonkeyPatch,
    service: str,
    examples: bool,
) -> None:
    env_file = _env_lines(ENV_EXAMPLE.read_text(), commented=examples)
    env = _container_env(services[service], env_file, dockerfile)
    for key, value in env.items():
        isolated_env.setenv(key, value)
    settings = ClientSettings()  # type: ignore[call-arg]  # client_id comes from FLEXLORA_CLIENT_ID
    client_id, rank = CLIENTS[service]
    assert (settings.client_id, settings.rank) == (client_id, rank)
    assert settings.federation == FEDERATION
    assert settings.metrics_port == int(env["FLEXLORA_METRICS_PORT"])


# --- metrics ports, scaling -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRAPED_SERVICES)
def test_metrics_are_exposed_to_the_compose_network_only(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    port = _environment(service)["FLEXLORA_METRICS_PORT"]
    assert 0 < int(port) < 65536
    exposed = [str(p) for p in service.get("expose", [])]
    assert port in exposed, f"{name} serves metrics on {port} but does not expose it"
    # A host port would clash between replicas and between the clients that share the 9100.
    assert "ports" not in service


def test_the_aggregator_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    aggregator = services["aggregator"]
    assert "container_name" not in aggregator and "ports" not in aggregator and "hostname" not in aggregator


# --- health checks run commands that exist --------------------------------------------------------------


def _cli_app() -> typer.Typer:
    """The Typer app pyproject's `flexlora` console script runs: the script is flexlora.entry:main, which checks
    that no other package shadows ours (flexlora.packages) and then runs flexlora.cli's app."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attribute = scripts["flexlora"].partition(":")
    entry = importlib.import_module(module)
    assert callable(getattr(entry, attribute))
    assert "from flexlora.cli import app" in inspect.getsource(entry), "the entry point must run the CLI's app"
    from flexlora.cli import app

    assert isinstance(app, typer.Typer)
    return app


def _healthcheck_command(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), f"unexpected healthcheck form {test!r}"
    return [str(part) for part in test[1:]]


def test_the_aggregator_healthcheck_is_the_clis_own_check(services: dict[str, dict[str, Any]]) -> None:
    assert _healthcheck_command(services["aggregator"]) == ["flexlora", "aggregator", "--check"]
    result = CliRunner().invoke(_cli_app(), ["aggregator", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(r"--check\b", result.output), result.output


@pytest.mark.parametrize(("name", "tool"), [("rabbitmq", "rabbitmq-diagnostics"), ("redis", "redis-cli")])
def test_broker_and_store_healthchecks_use_their_images_tools(
    services: dict[str, dict[str, Any]], name: str, tool: str
) -> None:
    assert _healthcheck_command(services[name])[0] == tool


def test_model_init_calls_a_function_that_exists(services: dict[str, dict[str, Any]]) -> None:
    entrypoint = services["model-init"]["entrypoint"]
    assert entrypoint[:2] == ["python", "-c"]
    imported = re.search(r"from ([\w.]+) import (\w+)", entrypoint[2])
    assert imported, entrypoint
    module, function = imported.groups()
    # Parsed, not imported: importing the model module would load torch for nothing.
    source = ROOT / Path(*module.split(".")).with_suffix(".py")
    defined = {node.name for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, ast.FunctionDef)}
    assert function in defined


def test_the_model_cache_volume_is_where_the_image_keeps_the_cache(
    services: dict[str, dict[str, Any]], dockerfile: Path
) -> None:
    cache = _dockerfile_env(dockerfile)[f"{ENV_PREFIX}CACHE"]
    for name in ("model-init", *CLIENTS):
        assert f"model-cache:{cache}" in services[name]["volumes"], name


def test_every_aggregator_shares_one_payload_store_on_a_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], dockerfile: Path
) -> None:
    """Any aggregator may finalise any round: scaled replicas must read each other's payloads, from a named
    volume whose directory the image creates for its user."""
    aggregator = services["aggregator"]
    url = aggregator["environment"][f"{ENV_PREFIX}PAYLOAD_STORE"]
    assert url.startswith("file:///")
    folder = url[len("file://") :]
    assert f"payloads:{folder}" in aggregator["volumes"] and "payloads" in compose["volumes"]
    assert folder in dockerfile.read_text(), "the image makes the directory, owned by its user"


def test_depends_on_names_services_that_can_meet_the_condition(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {target: {"condition": "service_started"} for target in depends}
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec.get("condition", "service_started")
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no check"
            if condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} must be a one-shot for {name} to wait"


# --- RabbitMQ definitions -----------------------------------------------------------------------------


Declaration = tuple[str, dict[str, Any]]


class _RecordingChannel:
    """Stands in for pika's BlockingChannel and records what the transport would declare on it."""

    def __init__(self, log: list[Declaration]) -> None:
        self.log = log
        self.is_open = True

    def _record(self, method: str, *args: Any, **kwargs: Any) -> None:
        # Bound to pika's real signature: a call pika would refuse fails here too, and every argument the
        # transport leaves out takes pika's own default, which is what reaches RabbitMQ.
        bound = inspect.signature(getattr(BlockingChannel, method)).bind(self, *args, **kwargs)
        bound.apply_defaults()
        self.log.append((method, {k: v for k, v in bound.arguments.items() if k != "self"}))

    def confirm_delivery(self) -> None:
        pass

    def exchange_declare(self, *args: Any, **kwargs: Any) -> None:
        self._record("exchange_declare", *args, **kwargs)

    def queue_declare(self, *args: Any, **kwargs: Any) -> None:
        self._record("queue_declare", *args, **kwargs)

    def queue_bind(self, *args: Any, **kwargs: Any) -> None:
        self._record("queue_bind", *args, **kwargs)

    def close(self) -> None:
        self.is_open = False


class _RecordingConnection:
    """Stands in for pika.BlockingConnection: runs the transport's callbacks on its own I/O thread."""

    def __init__(self, log: list[Declaration]) -> None:
        self.log = log
        self.is_open = True
        self._callbacks: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def channel(self) -> _RecordingChannel:
        return _RecordingChannel(self.log)

    def add_callback_threadsafe(self, callback: Any) -> None:
        self._callbacks.put(callback)

    def process_data_events(self, time_limit: float = 0) -> None:
        with contextlib.suppress(queue.Empty):
            self._callbacks.get(timeout=time_limit)()

    def close(self) -> None:
        self.is_open = False


def _declared(monkeypatch: pytest.MonkeyPatch, topology: Topology, vhost: str) -> dict[str, list[dict[str, Any]]]:
    """Topology.core() as the RabbitMQ transport declares it, in the shape of a definitions file."""
    log: list[Declaration] = []
    monkeypatch.setattr(pika, "BlockingConnection", lambda params: _RecordingConnection(log))
    transport = RabbitMQTransport("amqp://u:p@localhost:5672/%2F", call_timeout=5)
    try:
        transport.declare(topology.core())
    finally:
        transport.close()
    out: dict[str, list[dict[str, Any]]] = {"exchanges": [], "queues": [], "bindings": []}
    for method, call in log:
        assert not call.get("passive") and not call.get("exclusive"), f"{method} {call} cannot be pre-declared"
        if method == "exchange_declare":
            out["exchanges"].append(
                {
                    "name": call["exchange"],
                    "vhost": vhost,
                    "type": str(getattr(call["exchange_type"], "value", call["exchange_type"])),
                    "durable": call["durable"],
                    "auto_delete": call["auto_delete"],
                    "internal": call["internal"],
                    "arguments": call["arguments"] or {},
                }
            )
        elif method == "queue_declare":
            out["queues"].append(
                {
                    "name": call["queue"],
                    "vhost": vhost,
                    "durable": call["durable"],
                    "auto_delete": call["auto_delete"],
                    "arguments": call["arguments"] or {},
                }
            )
        else:
            out["bindings"].append(
                {
                    "source": call["exchange"],
                    "vhost": vhost,
                    "destination": call["queue"],
                    "destination_type": "queue",
                    "routing_key": call["routing_key"] or "",
                    "arguments": call["arguments"] or {},
                }
            )
    return out


def _key(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True)


def test_the_definitions_declare_what_the_code_declares(
    monkeypatch: pytest.MonkeyPatch, definitions: dict[str, Any], env_example: dict[str, str]
) -> None:
    assert env_example.get(f"{ENV_PREFIX}FEDERATION", FEDERATION) == FEDERATION
    vhost = pika.URLParameters(env_example[f"{ENV_PREFIX}BROKER_URL"]).virtual_host
    assert vhost == "/"
    assert {"name": vhost} in definitions["vhosts"]
    expected = _declared(monkeypatch, Topology(FEDERATION), vhost)
    assert len(expected["queues"]) == 2 and len(expected["bindings"]) == 3, "the recording missed declarations"
    for kind in ("exchanges", "queues", "bindings"):
        # Any difference in a name, type, flag or argument and the services' own declare fails with
        # PRECONDITION_FAILED against the pre-declared object, so compare every field, not only names.
        assert sorted(map(_key, definitions[kind])) == sorted(map(_key, expected[kind])), kind


def test_the_definitions_user_is_the_one_in_the_broker_url(
    definitions: dict[str, Any], env_example: dict[str, str]
) -> None:
    params = pika.URLParameters(env_example[f"{ENV_PREFIX}BROKER_URL"])
    assert isinstance(params.credentials, pika.PlainCredentials)
    username, password = params.credentials.username, params.credentials.password
    (user,) = [u for u in definitions["users"] if u["name"] == username]
    assert password_matches(user, password), "the URL's password does not match the hash"
    assert "administrator" in user["tags"], "the management UI needs the administrator tag"
    (permission,) = [p for p in definitions["permissions"] if p["user"] == username and p["vhost"] == "/"]
    topology = Topology(FEDERATION)
    # Clients share these credentials, so their own adapter queues must be allowed too.
    names = [spec.name for spec in topology.core() if isinstance(spec, ExchangeSpec | QueueSpec)]
    names.append(topology.adapter_queue("edge-r4"))
    for right in ("configure", "write", "read"):
        for name in names:
            assert re.search(permission[right], name), f"{username} may not {right} {name}"


def test_rabbitmq_mounts_the_definitions_and_the_config_that_loads_them(services: dict[str, dict[str, Any]]) -> None:
    mounts: dict[str, Path] = {}
    for volume in services["rabbitmq"]["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith((".", "/")):
            path = (COMPOSE_DIR / source).resolve()
            assert path.is_file(), f"bind mount source {source} does not exist"
            mounts[target] = path
    configs = [t for t in mounts if re.fullmatch(r"/etc/rabbitmq/conf\.d/[\w.-]+\.conf", t)]
    assert len(configs) == 1, f"expected one file mounted into conf.d, got {configs}"
    loads = re.findall(r"^load_definitions\s*=\s*(\S+)\s*$", mounts[configs[0]].read_text(), re.MULTILINE)
    assert len(loads) == 1, loads
    assert mounts.get(loads[0]) == COMPOSE_DIR / "rabbitmq" / "definitions.json", f"{loads[0]} is not mounted"
