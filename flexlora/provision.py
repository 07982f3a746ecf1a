"""`flexlora provision`: a least-privilege RabbitMQ user per client, its mailbox declared, its credentials written.

Run by an operator with the broker's administrator credentials. Each client's credentials go to
`<out>/<client_id>.env` (mode 0600: FLEXLORA_BROKER_URL, FLEXLORA_FEDERATION, FLEXLORA_CLIENT_ID, the
settings `flexlora client` reads), or to standard output when no --out is given; never to the log.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from broker.provision import ClientAccess

console = Console(stderr=True)
# As edge_client.settings.ClientSettings.client_id, without importing the client side here.
CLIENT_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def issue_certificates(out: Path, ca_cert: Path, ca_key: Path, client_ids: list[str], days: int) -> None:
    """`<out>/<client>.pem` and `<client>.key` (mode 0600) for each client, signed by the CA, with `ca.pem` beside
    them: the files a device's FLEXLORA_TLS_* settings name (its env file says so)."""
    from broker.certificates import issue_device_certificate

    authority, key = ca_cert.read_bytes(), ca_key.read_bytes()
    for client_id in client_ids:
        issued = issue_device_certificate(authority, key, client_id, days=days)
        write_secret(out / f"{client_id}.key", issued.key_pem.decode())
        (out / f"{client_id}.pem").write_bytes(issued.cert_pem)
        console.print(f"{client_id}: TLS certificate (CN={client_id}, {days} days) → {out / (client_id + '.pem')}")
    (out / "ca.pem").write_bytes(authority)


def env_text(
    access: ClientAccess, federation: str, client_broker_url: str, signing_key: str | None = None, *, tls: bool = False
) -> str:
    """A client's credentials as FLEXLORA_* lines that `flexlora client` (or compose's env_file) reads; with `tls`,
    the certificate files `issue_certificates` wrote (to be copied beside the client)."""
    files = (
        f"FLEXLORA_TLS_CA_FILE=ca.pem\nFLEXLORA_TLS_CERT_FILE={access.client_id}.pem\n"
        f"FLEXLORA_TLS_KEY_FILE={access.client_id}.key\n"
        if tls
        else ""
    )
    return (
        f"# flexlora client {access.client_id} of federation {federation}: RabbitMQ user {access.username}. Secret.\n"
        f"FLEXLORA_BROKER_URL={access.broker_url(client_broker_url)}\n"
        f"FLEXLORA_FEDERATION={federation}\n"
        f"FLEXLORA_CLIENT_ID={access.client_id}\n"
        + (f"FLEXLORA_SIGNING_KEY={signing_key}\n" if signing_key is not None else "")
        + files
    )


def signing_keys_for(path: Path, accesses: list[ClientAccess]) -> dict[str, str]:
    """The federation's signing keys (client id -> hex), kept in `path` for the aggregators
    (FLEXLORA_SIGNING_KEYS): a new key for every client given new credentials, the others' kept."""
    import json
    import secrets

    keys: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    for access in accesses:
        if access.password is not None:  # created or rotated; a kept user's env file is not rewritten
            keys[access.client_id] = secrets.token_hex(32)
    write_secret(path, json.dumps(keys, indent=2, sort_keys=True) + "\n")
    return keys


def write_secret(path: Path, text: str) -> None:
    """Write `text` readable by its owner only, atomically (a crash leaves the old file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a leftover file of the same name
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def provision(
    client_id: Annotated[list[str], typer.Option(help="a client to provision; repeat for several")],
    federation: Annotated[str | None, typer.Option(help="namespace of queues (default: FLEXLORA_FEDERATION)")] = None,
    broker_url: Annotated[
        str | None, typer.Option(help="the administrator's amqp://user:pass@host:port/vhost (or FLEXLORA_BROKER_URL)")
    ] = None,
    management_url: Annotated[
        str | None,
        typer.Option(help="RabbitMQ management API, e.g. https://admin:pass@broker:15671 (default: broker host:15672)"),
    ] = None,
    client_broker_url: Annotated[
        str | None,
        typer.Option(help="amqp(s)://host:port/vhost the clients connect to, no credentials (default: --broker-url's)"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="write <client_id>.env files here (else print to stdout)")] = None,
    rotate: Annotated[bool, typer.Option("--rotate", help="issue new passwords to users that exist")] = False,
    signing_keys: Annotated[
        Path | None,
        typer.Option(help="also give each new client an HMAC key; the aggregators' keys file (FLEXLORA_SIGNING_KEYS)"),
    ] = None,
    ca_cert: Annotated[
        Path | None,
        typer.Option(help="the federation's CA certificate (PEM): also issue each client a TLS certificate"),
    ] = None,
    ca_key: Annotated[Path | None, typer.Option(help="the CA's private key (PEM), with --ca-cert")] = None,
    cert_days: Annotated[int, typer.Option(min=1, help="how long issued certificates are valid")] = 365,
) -> None:
    """Create a least-privilege RabbitMQ user per client (write: the updates exchange; read: its own mailbox;
    configure: nothing), declare the federation's queues and each client's mailbox, and hand out credentials."""
    from pydantic import ValidationError

    from aggregator.settings import AggregatorSettings
    from broker.connect import connect
    from broker.errors import BrokerError
    from broker.provision import (
        ManagementAPI,
        Outcome,
        provision_clients,
        vhost_of,
        without_credentials,
    )
    from broker.topology import Topology

    given: dict[str, Any] = {k: v for k, v in {"broker_url": broker_url, "federation": federation}.items() if v}
    try:
        settings = AggregatorSettings(**given)
    except ValidationError as exc:
        for err in exc.errors():
            console.print(f"[red]invalid setting[/] {'.'.join(map(str, err['loc']))}: {err['msg']}")
        raise typer.Exit(code=2) from exc
    bad = [cid for cid in client_id if not CLIENT_ID.fullmatch(cid)]
    if bad:  # the rule `flexlora client` applies to its own id
        console.print(f"[red]invalid client ids[/] {bad}: use letters, digits, '_', '.', '-' (at most 128)")
        raise typer.Exit(code=2)
    if (ca_cert is None) != (ca_key is None) or (ca_cert is not None and out is None):
        console.print("[red]--ca-cert and --ca-key go together, and need --out for the certificates[/]")
        raise typer.Exit(code=2)
    vhost = vhost_of(settings.broker_url)
    template = without_credentials(client_broker_url or settings.broker_url)
    if vhost_of(template) != vhost:
        console.print(f"[red]--client-broker-url names vhost {vhost_of(template)!r}, the broker URL {vhost!r}[/]")
        raise typer.Exit(code=2)
    api = ManagementAPI.from_urls(management_url, settings.broker_url)
    try:
        with connect(settings.broker_url, connection_name="flexlora-provision") as admin:
            accesses = provision_clients(
                api, admin, Topology(settings.federation), client_id, vhost=vhost, rotate=rotate
            )
    except BrokerError as exc:
        console.print(f"[red]cannot provision:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from exc
    keys = signing_keys_for(signing_keys, accesses) if signing_keys is not None else {}
    if ca_cert is not None and ca_key is not None and out is not None:
        issue_certificates(out, ca_cert, ca_key, [a.client_id for a in accesses], cert_days)
    for access in accesses:
        where = out / f"{access.client_id}.env" if out is not None else None
        if access.outcome is Outcome.KEPT:
            note = "" if where is None or where.exists() else f"; {where} is missing: --rotate issues a new password"
            console.print(f"{access.client_id}: user {access.username} kept, permissions re-applied{note}")
            continue
        text = env_text(access, settings.federation, template, keys.get(access.client_id), tls=ca_cert is not None)
        if where is None:
            typer.echo(text)
        else:
            write_secret(where, text)
        console.print(f"{access.client_id}: user {access.username} {access.outcome.value} → {where or 'stdout'}")


def server_certs(
    host: Annotated[list[str], typer.Argument(help="every name or address the servers are dialled by")],
    out: Annotated[Path, typer.Option(help="write ca.pem, server.pem and server.key (and a new ca.key) here")],
    ca_cert: Annotated[Path | None, typer.Option(help="sign with this CA (PEM); default: a new CA in --out")] = None,
    ca_key: Annotated[Path | None, typer.Option(help="the CA's private key (PEM), with --ca-cert")] = None,
    cert_days: Annotated[int, typer.Option(min=1, help="how long the server certificate is valid")] = 825,
) -> None:
    """Issue one TLS certificate for a deployment's servers (RabbitMQ nodes, Redis, Sentinels) naming every host
    given, signed by the federation's CA (a new one unless --ca-cert/--ca-key are given). The same CA then
    signs devices' certificates: `flexlora provision --ca-cert <out>/ca.pem --ca-key <out>/ca.key`."""
    from broker.certificates import issue_server_certificate, new_authority

    if (ca_cert is None) != (ca_key is None):
        console.print("[red]give both --ca-cert and --ca-key, or neither (a new CA)[/]")
        raise typer.Exit(code=2)
    out.mkdir(parents=True, exist_ok=True)
    if ca_cert is None or ca_key is None:
        authority = new_authority()
        authority_pem, authority_key = authority.cert_pem, authority.key_pem
        write_secret(out / "ca.key", authority_key.decode())
        console.print(f"new CA → {out / 'ca.pem'} (its key {out / 'ca.key'}: keep it off the servers)")
    else:
        authority_pem, authority_key = ca_cert.read_bytes(), ca_key.read_bytes()
    try:
        issued = issue_server_certificate(authority_pem, authority_key, host, days=cert_days)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    (out / "ca.pem").write_bytes(authority_pem)
    (out / "server.pem").write_bytes(issued.cert_pem)
    write_secret(out / "server.key", issued.key_pem.decode())
    console.print(f"server certificate for {', '.join(host)} ({cert_days} days) → {out / 'server.pem'}")
