"""Checks compose/docker-compose.ha.yml (3 RabbitMQ nodes, Redis with a replica and three Sentinels, TLS only)
against the code and against its own configuration files, without Docker: the names the nodes cluster by,
the ports left open, the addresses every process is given, and the certificate the header's command issues."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import pytest
import yaml
from cryptography import x509
from typer.testing import CliRunner

from aggregator.settings import AggregatorSettings
from aggregator.stores import SCHEMES
from edge_client.settings import ClientSettings
from flexlora.cli import app
from tests.compose.test_compose_file import _environment, isolated_env, password_matches

__all__ = ["isolated_env"]  # a fixture, used by name

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"
HA_FILE = COMPOSE_DIR / "docker-compose.ha.yml"
CLIENTS = {"client-r4": ("edge-r4", 4), "client-r8": ("edge-r8", 8), "client-r16": ("edge-r16", 16)}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(HA_FILE.read_text())  # merge keys resolved, as compose does
    assert isinstance(data, dict)
    result = data["services"]
    assert isinstance(result, dict)
    return result


def _named(services: dict[str, dict[str, Any]], prefix: str) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if re.fullmatch(rf"{prefix}-\d+", name)}


def _conf(name: str) -> dict[str, str]:
    """`key = value` (RabbitMQ) or `key value` (Redis; Sentinel's directives are two words) lines of a file under
    compose/ha, comments left out."""
    values = {}
    for line in (COMPOSE_DIR / "ha" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if " = " in line:
            key, _, value = line.partition(" = ")
        elif line.startswith("sentinel "):  # `sentinel monitor <name> ...`: the directive is two words
            first, second, value = line.split(" ", 2)
            key = f"{first} {second}"
        elif line:
            key, _, value = line.partition(" ")
        else:
            continue
        values[key.strip()] = value.strip()
    return values


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to compose/) of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            out[target] = source
    return out


def test_the_three_rabbitmq_nodes_cluster_by_the_names_they_run_as(services: dict[str, dict[str, Any]]) -> None:
    nodes = _named(services, "rabbitmq")
    assert len(nodes) == 3
    conf = _conf("rabbitmq.conf")
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    assert listed == {f"rabbit@{node['hostname']}" for node in nodes.values()}
    cookies = {node["environment"]["RABBITMQ_ERLANG_COOKIE"] for node in nodes.values()}
    assert len(cookies) == 1, "the nodes of one cluster must share one Erlang cookie"
    for node in nodes.values():
        mounts = _mounts(node)
        assert mounts["/etc/rabbitmq/conf.d/30-flexlora.conf"] == "./ha/rabbitmq.conf"
        assert mounts[conf["load_definitions"]] == "./ha/definitions.json"
        plugins = (COMPOSE_DIR / mounts["/etc/rabbitmq/enabled_plugins"]).read_text()
        assert "rabbitmq_auth_mechanism_ssl" in plugins  # devices may log in by certificate (EXTERNAL)
        for path in mounts.values():
            assert path == "./certs" or (COMPOSE_DIR / path).is_file(), f"{path} does not exist"


def test_no_server_has_a_plain_port(services: dict[str, dict[str, Any]]) -> None:
    rabbit = _conf("rabbitmq.conf")
    assert rabbit["listeners.tcp"] == "none" and rabbit["listeners.ssl.default"] == "5671"
    assert rabbit["ssl_options.verify"] == "verify_peer"
    assert "management.tcp.port" not in rabbit and rabbit["management.ssl.port"] == "15671"
    for node in _named(services, "rabbitmq").values():
        assert all(str(p).endswith(":5671") for p in node.get("ports", []))  # only the TLS listener is published
    for name in ("redis.conf", "sentinel.conf"):
        conf = _conf(name)
        assert conf["port"] == "0" and conf["tls-replication"] == "yes", name
        assert {conf["tls-cert-file"], conf["tls-key-file"], conf["tls-ca-cert-file"]} == {
            "/certs/server.pem",
            "/certs/server.key",
            "/certs/ca.pem",
        }


def _broker_addresses(env: dict[str, str]) -> list[tuple[str, str, int | None]]:
    return [(u.scheme, u.hostname or "", u.port) for u in map(urlsplit, env["FLEXLORA_BROKER_URL"].split(","))]


@pytest.mark.parametrize("name", ["aggregator", *CLIENTS])
def test_every_process_is_given_every_rabbitmq_node_over_tls(services: dict[str, dict[str, Any]], name: str) -> None:
    env = _environment(services[name])
    hosts = {node["hostname"] for node in _named(services, "rabbitmq").values()}
    assert sorted(_broker_addresses(env)) == sorted(("amqps", host, 5671) for host in hosts)
    definitions = json.loads((COMPOSE_DIR / "ha" / "definitions.json").read_text())
    assert "queues" not in definitions  # declared once every node runs, so each quorum queue gets three members
    for url in env["FLEXLORA_BROKER_URL"].split(","):
        credentials = pika.URLParameters(url).credentials
        assert isinstance(credentials, pika.PlainCredentials)
        (user,) = [u for u in definitions["users"] if u["name"] == credentials.username]
        assert password_matches(user, credentials.password)
    assert env["FLEXLORA_TLS_CA_FILE"].startswith("/certs/") and _mounts(services[name])["/certs"] == "./certs"


def test_the_store_is_found_through_every_sentinel_and_acks_wait_for_the_replica(
    services: dict[str, dict[str, Any]],
) -> None:
    env = _environment(services["aggregator"])
    url = urlsplit(env["FLEXLORA_REDIS_URL"])
    assert f"{url.scheme}://" in SCHEMES and url.scheme == "rediss+sentinel"
    sentinel = _conf("sentinel.conf")
    sentinels = _named(services, "sentinel")
    assert len(sentinels) == 3
    dialled = sorted(address.rpartition(":")[::2] for address in url.netloc.split(","))
    assert dialled == sorted((s["hostname"], sentinel["tls-port"]) for s in sentinels.values())
    name, host, port, quorum = sentinel["sentinel monitor"].split()
    assert url.path.strip("/").split("/") == [name, "0"]
    redis = _conf("redis.conf")
    assert (host, port) == (services["redis-primary"]["hostname"], redis["tls-port"])
    assert len(sentinels) // 2 < int(quorum) <= len(sentinels)  # a majority, and reachable with one down
    assert sentinel["sentinel announce-hostnames"] == "yes"  # names the certificate carries, not addresses
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == [host, port]
    assert int(env["FLEXLORA_MIN_REPLICAS"]) >= 1


def test_the_settings_accept_each_container_environment(
    services: dict[str, dict[str, Any]], isolated_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The settings check that the CA file is there: the one `flexlora server-certs` writes, here in tmp_path.
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    for key, value in _environment(services["aggregator"]).items():
        isolated_env.setenv(key, value)
    isolated_env.setenv("FLEXLORA_TLS_CA_FILE", str(ca))
    settings = AggregatorSettings()
    assert settings.min_replicas == 1 and settings.redis_url.startswith("rediss+sentinel://")
    for service, (client_id, rank) in CLIENTS.items():
        for key in list(_environment(services["aggregator"])):
            isolated_env.delenv(key, raising=False)
        for key, value in _environment(services[service]).items():
            isolated_env.setenv(key, value)
        isolated_env.setenv("FLEXLORA_TLS_CA_FILE", str(ca))
        client = ClientSettings()  # type: ignore[call-arg]  # client_id comes from FLEXLORA_CLIENT_ID
        assert (client.client_id, client.rank) == (client_id, rank)


def test_the_headers_server_certs_command_names_every_tls_server(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    (line,) = [line for line in HA_FILE.read_text().splitlines() if "flexlora server-certs" in line]
    argv = shlex.split(line.lstrip("# "))[1:]
    argv[argv.index("--out") + 1] = str(tmp_path)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert {p.name for p in tmp_path.iterdir()} == {"ca.pem", "ca.key", "server.pem", "server.key"}
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = set(
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    )
    servers = {s["hostname"] for n, s in services.items() if n.startswith(("rabbitmq-", "redis-", "sentinel-"))}
    assert servers <= names
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes()))
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
