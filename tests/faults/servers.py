"""Private RabbitMQ and Redis servers for tests that restart, kill or reconfigure them: never the shared ones.

A test gets its own node on free ports (its own node name, Erlang distribution port, data and log folders,
config and enabled-plugins files), so stopping or killing it cannot disturb the shared RabbitMQ on 5672 or
Redis on 6379 that other tests use. Debian's `rabbitmq-server` wrapper runs the node as the `rabbitmq` user
when started by root, so its folder lives outside pytest's root-only tmp folder and belongs to that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions
import redis

RABBITMQ_SERVER = "rabbitmq-server"
RABBITMQCTL = "rabbitmqctl"
REDIS_SERVER = "redis-server"


@dataclass(frozen=True)
class ServerTls:
    """A server's TLS files (PEM): the CA that verifies client certificates, and its own certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


class ServerUnavailable(RuntimeError):
    """This machine cannot run a private server (not installed, or not allowed); tests skip on it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port for a Redis Cluster node: at most 55535, with the port 10000 above it (its cluster bus) free
    too."""
    for _ in range(500):
        port = random.randrange(20000, 55536)
        with socket.socket() as node, socket.socket() as bus:
            try:
                node.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise ServerUnavailable("no free port pair for a Redis Cluster node")


def _wait(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> float:
    """Poll until `condition` holds; the seconds it took. Raises TimeoutError naming `what`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


class OwnRabbitMQ:
    """A RabbitMQ node of the test's own. `started_in` is the last start-up time in seconds (measured to the
    first successful AMQP connection, and the management API answering when it is enabled)."""

    def __init__(
        self,
        *,
        management: bool = False,
        start_timeout: float = 120.0,
        tls: ServerTls | None = None,
        external_auth: bool = False,
    ) -> None:
        if shutil.which(RABBITMQ_SERVER) is None or shutil.which(RABBITMQCTL) is None:
            raise ServerUnavailable("rabbitmq-server is not installed")
        if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != "rabbitmq":
            raise ServerUnavailable("Debian's rabbitmq-server wrapper runs only as root or rabbitmq")
        self.management = management
        self.start_timeout = start_timeout
        self.node = f"flexlora-{uuid.uuid4().hex[:10]}@localhost"
        self.port, self.dist_port = free_port(), free_port()
        self.management_port = free_port() if management else None
        # A TLS listener beside the loopback TCP one (which only the start-up probe and rabbitmqctl-like set-up use);
        # with external_auth, devices may log in by their certificate's common name (EXTERNAL).
        self.tls, self.external_auth = tls, external_auth
        self.tls_port = free_port() if tls is not None else None
        self.directory = Path(tempfile.mkdtemp(prefix="flexlora-rabbitmq-"))
        self.started_in = 0.0
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_files()

    @property
    def url(self) -> str:
        """AMQP URL of the node's default (loopback-only) administrator."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def tls_url(self) -> str:
        """amqps:// URL of the TLS listener (the guest administrator, allowed from loopback)."""
        assert self.tls_port is not None, "started without TLS"
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/%2F"

    @property
    def management_url(self) -> str:
        assert self.management_port is not None, "started without the management plugin"
        return f"http://127.0.0.1:{self.management_port}"

    def _write_files(self) -> None:
        d = self.directory
        (d / "mnesia").mkdir()
        (d / "log").mkdir()
        lines = [f"listeners.tcp.1 = 127.0.0.1:{self.port}", "log.console = false"]
        if self.management_port is not None:
            lines += [f"management.tcp.port = {self.management_port}", "management.tcp.ip = 127.0.0.1"]
        if self.tls is not None:
            for name, source in (("ca.pem", self.tls.ca_file), ("server.pem", self.tls.cert_file)):
                shutil.copy(source, d / name)
            shutil.copy(self.tls.key_file, d / "server.key")
            lines += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {d / 'ca.pem'}",
                f"ssl_options.certfile = {d / 'server.pem'}",
                f"ssl_options.keyfile = {d / 'server.key'}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        if self.external_auth:
            lines += ["auth_mechanisms.1 = PLAIN", "auth_mechanisms.2 = EXTERNAL", "ssl_cert_login_from = common_name"]
        plugins = [
            p
            for p, on in (("rabbitmq_management", self.management), ("rabbitmq_auth_mechanism_ssl", self.external_auth))
            if on
        ]
        (d / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (d / "plugins").write_text(f"[{','.join(plugins)}].\n")
        if os.geteuid() == 0:
            shutil.chown(d, "rabbitmq", "rabbitmq")
            for path in d.rglob("*"):
                shutil.chown(path, "rabbitmq", "rabbitmq")

    def _env(self) -> dict[str, str]:
        d = self.directory
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "plugins"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
        }

    def _answers(self) -> bool:
        try:  # a bare TCP probe first: pika logs every refused attempt at ERROR
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        try:
            pika.BlockingConnection(pika.URLParameters(self.url + "?connection_attempts=1&socket_timeout=2")).close()
        except pika.exceptions.AMQPError:
            return False
        if self.management_port is None:
            return True
        import requests

        try:
            return requests.get(self.management_url + "/api/overview", auth=("guest", "guest"), timeout=2).ok
        except requests.RequestException:
            return False

    def start(self) -> float:
        """Start the node (with the data it had, after a stop or kill) and wait until it serves."""
        assert self._proc is None or self._proc.poll() is not None, "already running"
        started = time.monotonic()
        out = (self.directory / f"server-{self.starts}.out").open("wb")
        self._proc = subprocess.Popen(
            [RABBITMQ_SERVER], env=self._env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.starts += 1
        try:
            _wait(self._running_or_failed, self.start_timeout, f"RabbitMQ node {self.node}", every=0.2)
        except TimeoutError:
            self.kill()
            raise
        if self._proc.poll() is not None:
            raise ServerUnavailable(f"RabbitMQ node {self.node} exited: {self.log_tail()}")
        self.started_in = time.monotonic() - started
        return self.started_in

    def _running_or_failed(self) -> bool:
        return (self._proc is not None and self._proc.poll() is not None) or self._answers()

    def log_tail(self, chars: int = 3000) -> str:
        texts = [p.read_text(errors="replace") for p in sorted(self.directory.glob("server-*.out"))]
        texts += [p.read_text(errors="replace") for p in sorted((self.directory / "log").glob("*.log"))]
        return "\n".join(texts)[-chars:]

    def _beam_pid(self) -> int | None:
        try:
            return int((self.directory / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def ctl(self, *args: str) -> str:
        """Run `rabbitmqctl` against this node; its output."""
        done = subprocess.run([RABBITMQCTL, "-n", self.node, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    def stop(self) -> None:
        """A clean shutdown (`rabbitmqctl stop`): queues and persistent messages are on disk."""
        if self._proc is None or self._proc.poll() is not None:
            return
        subprocess.run([RABBITMQCTL, "-n", self.node, "stop"], capture_output=True, timeout=120, check=False)
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the Erlang VM: what a crash or an OOM kill does."""
        if self._proc is None:
            return
        pid = self._beam_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=60)
        (self.directory / "pid").unlink(missing_ok=True)

    def restart(self, *, kill: bool = False) -> float:
        self.kill() if kill else self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the node and remove its folder."""
        try:
            self.stop()
        finally:
            if self._proc is not None and self._proc.poll() is None:
                self.kill()
            shutil.rmtree(self.directory, ignore_errors=True)


class OwnRedis:
    """A Redis of the test's own, optionally with an append-only file; restart() keeps its data folder."""

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        tls: ServerTls | None = None,
        replica_of: int | None = None,
        cluster: bool = False,
    ) -> None:
        if shutil.which(REDIS_SERVER) is None:
            raise ServerUnavailable("redis-server is not installed")
        self.cluster = cluster  # a node of a Redis Cluster (OwnRedisCluster joins the nodes)
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_cluster_port() if cluster else free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.tls = tls  # TLS only: no plain TCP port at all
        self.replica_of = replica_of  # the port of the primary this one replicates (on loopback)
        self.started_in = 0.0
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        if self.tls is not None:
            return redis.Redis.from_url(self.url, ssl_ca_certs=str(self.tls.ca_file))
        return redis.Redis.from_url(self.url)

    def _answers(self) -> bool:
        """Up and serving: over TLS without checking the certificate's names, which a test may have chosen to
        leave 127.0.0.1 out of."""
        try:
            if self.tls is not None:
                probe = redis.Redis(port=self.port, ssl=True, ssl_cert_reqs="none", socket_timeout=1)
                return bool(probe.ping())
            client = self.client()
            client.connection_pool.connection_kwargs["socket_timeout"] = 1
            return bool(client.ping())
        except redis.RedisError:
            return False

    def start(self) -> float:
        started = time.monotonic()
        ports: list[str] = ["--port", str(self.port)]
        if self.tls is not None:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "optional"]
            ports += ["--tls-cert-file", str(self.tls.cert_file), "--tls-key-file", str(self.tls.key_file)]
            ports += ["--tls-ca-cert-file", str(self.tls.ca_file)]
            # Replication over TLS too (no server has a plain port), on a primary as well: Sentinel makes a primary
            # that comes back after a failover the new one's replica, which without it tried plain TCP to a TLS
            # port and never synchronised, so no record was ever safe again (WAIT answered 0 replicas).
            ports += ["--tls-replication", "yes"]
        if self.replica_of is not None:
            ports += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        if self.cluster:
            ports += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.directory / "nodes.conf")]
            ports += ["--cluster-node-timeout", "2000"]
        cmd = [
            REDIS_SERVER,
            *ports,
            *("--bind", "127.0.0.1", "--dir", str(self.directory)),
            *("--save", "", "--appendonly", "yes" if self.appendonly else "no"),
            *("--appendfsync", self.appendfsync, "--logfile", str(self.directory / "redis.log")),
        ]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.starts += 1
        _wait(lambda: self._answers() or self._proc is None or self._proc.poll() is not None, 60, "Redis")
        if self._proc.poll() is not None:
            raise ServerUnavailable(f"redis-server exited: {self.log_tail()}")
        self.started_in = time.monotonic() - started
        return self.started_in

    @property
    def pid(self) -> int:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("this Redis is not running")
        return self._proc.pid

    def log_tail(self, chars: int = 2000) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM: Redis writes and fsyncs its append-only file before it exits."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=60)

    def kill(self) -> None:
        """SIGKILL: the process dies at once; what it had not yet written to the file is gone."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=60)

    def restart(self, *, kill: bool = False) -> float:
        self.kill() if kill else self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()


class OwnRedisCluster:
    """A Redis Cluster of the test's own: `primaries` nodes on loopback, the 16384 slots spread over them by
    `redis-cli --cluster create`, no replicas."""

    def __init__(self, directory: Path, *, primaries: int = 3) -> None:
        if shutil.which("redis-cli") is None:
            raise ServerUnavailable("redis-cli is not installed")
        self.nodes = [OwnRedis(directory / f"node{i}", appendonly=False, cluster=True) for i in range(primaries)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def _ok(self) -> bool:
        try:
            return all(node.client().cluster("info")["cluster_state"] == "ok" for node in self.nodes)
        except redis.RedisError:
            return False

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _wait(self._ok, 60, "the Redis Cluster's slots to be served")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class OwnSentinel:
    """A Redis Sentinel of the test's own, monitoring a primary on loopback under `name`."""

    def __init__(
        self,
        directory: Path,
        primary_port: int,
        *,
        name: str = "flexlora",
        quorum: int = 2,
        tls: ServerTls | None = None,
    ) -> None:
        if shutil.which(REDIS_SERVER) is None:
            raise ServerUnavailable("redis-server is not installed")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.name = name
        self.tls = tls  # TLS only, to its clients and to the Redis servers it watches
        ports = [f"port {self.port}"]
        if tls is not None:
            ports = ["port 0", f"tls-port {self.port}", "tls-replication yes", "tls-auth-clients optional"]
            ports += [f"tls-cert-file {tls.cert_file}", f"tls-key-file {tls.key_file}"]
            ports += [f"tls-ca-cert-file {tls.ca_file}"]
        lines = [
            *ports,
            "bind 127.0.0.1",
            f"dir {self.directory}",
            f"logfile {self.directory / 'sentinel.log'}",
            f"sentinel monitor {name} 127.0.0.1 {primary_port} {quorum}",
            # Several seconds, as in production: at 1 s a loaded 2-core machine left a just-promoted primary
            # unanswered long enough for a second failover, onto the restarted empty old primary, which then
            # wiped the data every replica had (seen in tests/faults/test_sentinel.py, ~1 run in 4).
            f"sentinel down-after-milliseconds {name} 5000",
            f"sentinel failover-timeout {name} 4000",
            f"sentinel parallel-syncs {name} 1",
        ]
        (self.directory / "sentinel.conf").write_text("\n".join(lines) + "\n")  # Sentinel rewrites it as it learns
        self._proc: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        if self.tls is not None:
            return redis.Redis(port=self.port, socket_timeout=1, ssl=True, ssl_ca_certs=str(self.tls.ca_file))
        return redis.Redis(port=self.port, socket_timeout=1)

    def start(self) -> None:
        cmd = [REDIS_SERVER, str(self.directory / "sentinel.conf"), "--sentinel"]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait(self._answers, 30, "Redis Sentinel")

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def primary_port(self) -> int | None:
        try:
            found = self.client().sentinel_get_master_addr_by_name(self.name)
        except redis.RedisError:
            return None
        return int(found[1]) if isinstance(found, tuple) else None

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=30)


@contextmanager
def own_rabbitmq(*, management: bool = False) -> Iterator[OwnRabbitMQ]:
    """A started private RabbitMQ node, stopped and removed afterwards."""
    node = OwnRabbitMQ(management=management)
    try:
        node.start()
        yield node
    finally:
        node.close()


@contextmanager
def own_redis(directory: Path, *, appendonly: bool = True, appendfsync: str = "everysec") -> Iterator[OwnRedis]:
    """A started private Redis keeping its files in `directory`, stopped afterwards."""
    server = OwnRedis(directory, appendonly=appendonly, appendfsync=appendfsync)
    try:
        server.start()
        yield server
    finally:
        server.close()
