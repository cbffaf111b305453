"""Scenario 8, auth and permissions: servers that require credentials, users limited to one type.

Authentication: for each method nats-server offers (user/password, token, nkey, TLS with
client certificates made here with ``cryptography``) a server requires it. The right
credentials run tasks end to end (provision, worker, submit, result, one task retried);
wrong ones make ``natrio.connect`` (default connect_timeout) raise ConnectError saying
why, at once or after one retry (a client certificate the server rejects: within
connect_timeout, see build_case), and no password, token, seed or key shows in the
exception (text, repr, cause and context, the formatted traceback) or in any log record.

Permissions: a worker user and a client user allowed natrio's subjects for one task type
(the lists below and in docs/permissions.md, found by running with deny-by-default and
reading the server's ``Publish Violation`` / ``Subscription Violation`` log lines) run
that type end to end with no violation, and are refused another type's tasks, consumer,
events and inboxes. The clients' inbox prefix is under the worker's, since a worker
replies only under its own. A submitter cannot steer where the worker publishes: tasks
whose Natrio-Reply names a JetStream API subject, a checkpoint key or another step's
event complete without the worker publishing there. Provisioning is done by an
unrestricted admin user.

Tests marked ``xfail(strict=True)`` pin natrio limitations found here: each becomes an
XPASS failure once fixed, so the marker goes with the fix. Defects found here and fixed
since have regression tests: wrong credentials retried until connect_timeout, URL
passwords with ``@`` half redacted, Worker.run hanging when it could not register.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import ssl
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import nkeys  # type: ignore[import-untyped]
import pytest
import trio
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import natrio
from natrio._cli import cli
from natrio._jetstream import JetStream

from . import harness

TASK_TYPE = "resize"
OTHER_TYPE = "thumbnail"
GROUP = "default"

# With the default connect_timeout (5 s), wrong credentials must be refused well inside
# this: at once, or after one retry when the first attempt ended in a connection reset
# (the server closes right after its -ERR, and now and then the reset is read first;
# natrio rightly retries a reset, after reconnect_time_wait, 0.5 s).
REJECT_BOUND = 3.0
CONNECT_TIMEOUT = 5.0  # natrio.connect's default
# How long a request on a denied subject is given before it counts as refused: the server
# drops it (and tells the client with -ERR), so no reply ever comes.
DENIED_WAIT = 0.5
FAST_RETRY = natrio.RetryPolicy(initial_interval=0.05, maximum_attempts=3)

AUTH_FAILED = "authentication error"  # nats-server's log line for each refused CONNECT
TLS_FAILED = "TLS handshake error"  # ... and for each refused TLS handshake

# The worker's inbox prefix, with the clients' under it: a worker answers only on
# subjects under its own connection's inbox prefix, so a client's inboxes must be there
# for its direct replies; the worker may publish only to the clients' part of it and may
# not subscribe to it.
WORKER_INBOX = "_INBOX_resize"
CLIENT_INBOX = "_INBOX_resize.client"
INSPECTOR_INBOX = "_INBOX_resize_inspector"

DOCS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "permissions.md"


# -- minimal permissions ----------------------------------------------------------------


@attrs.frozen
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    subscribe_deny: tuple[str, ...] = ()

    def conf(self) -> str:
        """The ``permissions`` block of a nats-server user."""
        deny = f", deny: {json.dumps(list(self.subscribe_deny))}" if self.subscribe_deny else ""
        return (
            f"permissions: {{ publish: {{ allow: {json.dumps(list(self.publish))} }}, "
            f"subscribe: {{ allow: {json.dumps(list(self.subscribe))}{deny} }} }}"
        )

    def without(self, subject: str) -> Permissions:
        assert subject in self.publish
        return attrs.evolve(self, publish=tuple(s for s in self.publish if s != subject))


def worker_permissions(task_type: str, *, group: str, inbox: str, client_inbox: str) -> Permissions:
    """What a worker serving one task type in one group needs (docs/permissions.md)."""
    consumer = f"{task_type}~{group}"
    assert client_inbox.startswith(inbox + "."), "replies go only under the worker's prefix"
    return Permissions(
        publish=(
            # its durable consumer: create/update, pull, ack/nak/+WPI/+TERM
            f"$JS.API.CONSUMER.CREATE.NATRIO_TASKS.{consumer}.natrio.task.{task_type}.{group}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.NATRIO_TASKS.{consumer}",
            f"$JS.ACK.NATRIO_TASKS.{consumer}.>",
            # outcomes: events, dead letters, streamed output (no type in its subject)
            f"natrio.event.{task_type}.>",
            f"natrio.dead.{task_type}.>",
            "natrio.stream.>",
            # inputs of dead letters too large for their entry
            "$O.natrio_dead_inputs.>",
            # direct replies to the clients that wait for results (under its own prefix)
            f"{client_inbox}.>",
            # the worker directory: its entry, and the others' (claims, bounds, partitions)
            "$JS.API.STREAM.INFO.KV_natrio_workers",
            "$KV.natrio_workers.>",
            "$JS.API.DIRECT.GET.KV_natrio_workers",
            "$JS.API.DIRECT.GET.KV_natrio_workers.$KV.natrio_workers.>",
            # routing: whether the type is partitioned, and which claim consumers exist
            f"$JS.API.DIRECT.GET.KV_natrio_routing.$KV.natrio_routing.partitions.{task_type}",
            "$JS.API.CONSUMER.NAMES.NATRIO_TASKS",
            # redeliveries: the outcome and pause-record look-ups, clearing the pause record
            # and the checkpoint (keys <run>.<step> and <run>.<step>.pause only)
            f"$JS.API.DIRECT.GET.NATRIO_EVENTS.natrio.event.{task_type}.>",
            "$JS.API.DIRECT.GET.KV_natrio_checkpoints.$KV.natrio_checkpoints.*.*",
            "$JS.API.DIRECT.GET.KV_natrio_checkpoints.$KV.natrio_checkpoints.*.*.pause",
            "$KV.natrio_checkpoints.*.*",
            "$KV.natrio_checkpoints.*.*.pause",
        ),
        subscribe=(f"{inbox}.>",),
        subscribe_deny=(f"{client_inbox}.>",),
    )


def client_permissions(task_type: str, *, inbox: str) -> Permissions:
    """What a client submitting one task type and awaiting its results needs."""
    return Permissions(
        publish=(
            f"natrio.task.{task_type}.>",
            f"$JS.API.DIRECT.GET.NATRIO_EVENTS.natrio.event.{task_type}.>",
            f"$JS.API.DIRECT.GET.KV_natrio_routing.$KV.natrio_routing.partitions.{task_type}",
        ),
        subscribe=(f"{inbox}.>", f"natrio.event.{task_type}.>"),
    )


def inspector_permissions(task_type: str, *, inbox: str) -> Permissions:
    """What reading one task type's dead letters and their inputs needs (Client.dead_letters,
    Client.dead_letter_input): the optional-features table of docs/permissions.md."""
    return Permissions(
        publish=(
            # a short-lived consumer per page of entries, its filter pinned to the type
            f"$JS.API.CONSUMER.CREATE.NATRIO_DLQ.*.natrio.dead.{task_type}.>",
            "$JS.API.CONSUMER.MSG.NEXT.NATRIO_DLQ.*",
            "$JS.API.CONSUMER.DELETE.NATRIO_DLQ.*",
            "$JS.API.DIRECT.GET.OBJ_natrio_dead_inputs",
            "$JS.API.DIRECT.GET.OBJ_natrio_dead_inputs.$O.natrio_dead_inputs.M.>",
        ),
        subscribe=(f"{inbox}.>",),
    )


WORKER_PERMISSIONS = worker_permissions(
    TASK_TYPE, group=GROUP, inbox=WORKER_INBOX, client_inbox=CLIENT_INBOX
)
CLIENT_PERMISSIONS = client_permissions(TASK_TYPE, inbox=CLIENT_INBOX)
INSPECTOR_PERMISSIONS = inspector_permissions(TASK_TYPE, inbox=INSPECTOR_INBOX)


def authorization(users: Iterable[tuple[str, str, Permissions | None]]) -> str:
    entries = []
    for user, password, permissions in users:
        extra = f", {permissions.conf()}" if permissions is not None else ""
        entries.append(
            f"    {{ user: {json.dumps(user)}, password: {json.dumps(password)}{extra} }}"
        )
    return "authorization {\n  users = [\n" + "\n".join(entries) + "\n  ]\n}\n"


# -- credentials ------------------------------------------------------------------------


@attrs.frozen
class Endpoint:
    """How one connection authenticates: credentials in the URL and/or connect options."""

    userinfo: str = ""
    options: Mapping[str, Any] = attrs.field(factory=dict)

    def url(self, server: natrio.EmbeddedServer) -> str:
        if not self.userinfo:
            return server.url
        return server.url.replace("nats://", f"nats://{self.userinfo}@", 1)


def connect(
    server: natrio.EmbeddedServer, endpoint: Endpoint, **extra: Any
) -> AbstractAsyncContextManager[natrio.Connection]:
    return natrio.connect(endpoint.url(server), **{**endpoint.options, **extra})


@attrs.frozen
class Wrong:
    """Credentials the server refuses, and how soon natrio must give up on them."""

    endpoint: Endpoint
    bound: float = REJECT_BOUND
    max_attempts: int = 2


@attrs.frozen
class Case:
    scenario: str
    fault: str
    config: str
    worker: Endpoint
    client: Endpoint
    wrong: tuple[Wrong, ...]
    secrets: tuple[str, ...]
    marker: str  # the server's log line for one refused attempt
    reason: str  # what the ConnectError must say (case-insensitive)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(directory: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def make_leaf(
    directory: Path,
    name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
) -> tuple[Path, Path]:
    """A server (127.0.0.1, localhost) or client certificate signed by ``ca``: (cert, key)."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_key_pem(key))
    key_path.chmod(0o600)
    return cert_path, key_path


def client_tls(ca_file: Path, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


def new_user_seed() -> str:
    """A fresh nkey user seed (``SU...``)."""
    return str(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())


def public_key(seed: str) -> str:
    return str(nkeys.from_seed(bytearray(seed.encode())).public_key.decode())


def build_case(method: str, directory: Path) -> Case:
    if method == "password":
        password, wrong = "pw-Kx81-right", "pw-Qz27-wrong"
        return Case(
            scenario="Auth: user/password",
            fault="wrong password (options and URL)",
            config=authorization([("alice", password, None)]),
            worker=Endpoint(userinfo=f"alice:{password}"),
            client=Endpoint(options={"user": "alice", "password": password}),
            wrong=(
                Wrong(Endpoint(options={"user": "alice", "password": wrong})),
                Wrong(Endpoint(userinfo=f"alice:{wrong}")),
            ),
            secrets=(password, wrong),
            marker=AUTH_FAILED,
            reason="authorization failed",
        )
    if method == "token":
        token, wrong = "tok-Hv53-right", "tok-Mb64-wrong"
        return Case(
            scenario="Auth: token",
            fault="wrong token (options and URL)",
            config=f"authorization {{ token: {json.dumps(token)} }}\n",
            worker=Endpoint(userinfo=token),
            client=Endpoint(options={"token": token}),
            wrong=(Wrong(Endpoint(options={"token": wrong})), Wrong(Endpoint(userinfo=wrong))),
            secrets=(token, wrong),
            marker=AUTH_FAILED,
            reason="authorization failed",
        )
    if method == "nkey":
        seed, wrong = new_user_seed(), new_user_seed()
        seed_file = directory / "user.nk"
        seed_file.write_text(seed + "\n")
        seed_file.chmod(0o600)
        return Case(
            scenario="Auth: nkey",
            fault="unknown nkey",
            config=f"authorization {{ users = [ {{ nkey: {public_key(seed)} }} ] }}\n",
            worker=Endpoint(options={"nkeys_seed": str(seed_file)}),
            client=Endpoint(options={"nkeys_seed_str": seed}),
            wrong=(Wrong(Endpoint(options={"nkeys_seed_str": wrong})),),
            secrets=(seed, wrong),
            marker=AUTH_FAILED,
            reason="authorization failed",
        )
    assert method == "tls"
    ca = make_ca(directory, "natrio-test-ca")
    ca_file = directory / "natrio-test-ca.pem"
    server_cert, server_key = make_leaf(directory, "nats-server", ca, server=True)
    worker_cert = make_leaf(directory, "natrio-worker", ca, server=False)
    rogue = make_ca(directory, "rogue-ca")
    rogue_cert = make_leaf(directory, "rogue-worker", rogue, server=False)
    tls = {
        "cert_file": str(server_cert),
        "key_file": str(server_key),
        "ca_file": str(ca_file),
        "verify": True,
        "timeout": 2,
    }
    return Case(
        scenario="Auth: TLS client certificates",
        fault="server not trusted; client certificate from another CA",
        config=f"tls {json.dumps(tls)}\n",
        worker=Endpoint(options={"tls": client_tls(ca_file, worker_cert)}),
        client=Endpoint(
            options={"tls": client_tls(ca_file, worker_cert), "tls_hostname": "localhost"}
        ),
        wrong=(
            # The client does not trust the server's CA: certificate verify failed.
            Wrong(Endpoint(options={"tls": client_tls(directory / "rogue-ca.pem", rogue_cert)})),
            # The server does not trust the client's certificate. In TLS 1.3 it says so
            # after the client has finished its side of the handshake and written CONNECT,
            # and about one attempt in three then reads EPIPE/ECONNRESET instead of the
            # alert; natrio retries those (72 tries: 45 refused at once, 17 after 0.5 s,
            # 10 after 1-3 s), so only connect_timeout bounds it.
            Wrong(
                Endpoint(options={"tls": client_tls(ca_file, rogue_cert)}),
                bound=CONNECT_TIMEOUT + 1.0,
                max_attempts=int(CONNECT_TIMEOUT / 0.5) + 1,
            ),
        ),
        secrets=tuple(
            key.read_text().splitlines()[1] for key in (worker_cert[1], rogue_cert[1], server_key)
        ),
        marker=TLS_FAILED,
        reason="TLS handshake failed",
    )


METHODS = ["password", "token", "nkey", "tls"]


# -- helpers ----------------------------------------------------------------------------


@asynccontextmanager
async def server_with(directory: Path, config: str) -> AsyncIterator[natrio.EmbeddedServer]:
    """A JetStream server (temporary store) run with ``config``; stopped on the way out."""
    path = directory / "nats-server.conf"
    path.write_text(config, encoding="utf-8")
    async with natrio.embedded_server(args=["-c", str(path)]) as server:
        yield server


def log_count(server: natrio.EmbeddedServer, marker: str) -> int:
    return sum(marker in line for line in server.log_tail.splitlines())


def violations(server: natrio.EmbeddedServer, user: str) -> list[str]:
    """The server's permission violations for ``user``: ``Publish Violation - Subject "..."``."""
    prefix = f'"$G/user:{user}" - '
    return [
        line.split(prefix, 1)[1]
        for line in server.log_tail.splitlines()
        if prefix in line and "Violation" in line
    ]


def exception_texts(exc: BaseException) -> list[str]:
    """str and repr of ``exc`` and everything chained to it, and the formatted traceback."""
    texts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        texts += [str(item), repr(item)]
        pending += [item.__cause__, item.__context__]
    return texts


def assert_not_leaked(secrets: Iterable[str], texts: Iterable[str]) -> None:
    texts = list(texts)
    for secret in secrets:
        for text in texts:
            assert secret not in text, f"a credential leaked into: {text[:300]!r}"


async def shout(ctx: natrio.TaskContext) -> bytes:
    if ctx.input.startswith(b"flaky") and ctx.attempt == 1:
        raise RuntimeError("the first attempt of a flaky task fails")
    if ctx.input.startswith(b"doomed"):
        raise natrio.Fatal("this task always fails")
    return ctx.input.upper()


def inputs(count: int, *, doomed: bool = False) -> list[bytes]:
    """``count`` task inputs: the first fails once (a redelivery), the last may be doomed."""
    items = [b"flaky 0"] + [f"task {i}".encode() for i in range(1, count)]
    if doomed:
        items[-1] = b"doomed"
    return items


async def run_tasks(
    worker_nc: natrio.Connection, client_nc: natrio.Connection, items: list[bytes]
) -> list[bytes | None]:
    """Serve TASK_TYPE on ``worker_nc``, submit ``items`` on ``client_nc``, wait for each.

    Returns each output, None for a dead-lettered task. The last completed task's result
    is read once more through ``Client.handle`` (events subscription and stored outcome).
    """
    worker = natrio.Worker(worker_nc, concurrency=8, shutdown_grace=0, retry=FAST_RETRY)
    worker.handle(TASK_TYPE, shout)
    client = natrio.Client(client_nc, timeout=5.0, check_interval=1.0)
    outputs: list[bytes | None] = []
    async with natrio.open_worker(worker, grace=0):
        handles = [await client.submit(TASK_TYPE, item) for item in items]
        for handle in handles:
            try:
                outputs.append(await handle.result())
            except natrio.TaskFailed:
                outputs.append(None)
        done = handles[0]
        again = await client.handle(TASK_TYPE, done.run_id, done.step_id).result()
        assert again == outputs[0]
    return outputs


def expected(items: list[bytes]) -> list[bytes | None]:
    return [None if item.startswith(b"doomed") else item.upper() for item in items]


async def settle(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds, at most a second.

    Polled (ASYNC110): the server's log arrives through the reader thread of
    EmbeddedServer, which offers nothing to wait on.
    """
    with trio.move_on_after(1.0):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.02)


async def wait_for_log(server: natrio.EmbeddedServer, marker: str, at_least: int) -> int:
    """The count of ``marker`` lines once it reaches ``at_least`` (or after 1 s)."""
    await settle(lambda: log_count(server, marker) >= at_least)
    return log_count(server, marker)


async def attempt_wrong(
    server: natrio.EmbeddedServer, case: Case, wrong: Wrong
) -> tuple[natrio.ConnectError, float, int]:
    """Connect with wrong credentials: the ConnectError, seconds taken, attempts the server saw."""
    await trio.sleep(0.1)  # the previous attempt's last log line may still be on its way
    before = log_count(server, case.marker)
    start = time.monotonic()
    with pytest.raises(natrio.ConnectError) as info:
        async with connect(server, wrong.endpoint):
            pass
    elapsed = time.monotonic() - start
    attempts = await wait_for_log(server, case.marker, before + 1) - before
    return info.value, elapsed, attempts


# -- authentication ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
async def test_credentials(method: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    case = build_case(method, tmp_path)
    items = inputs(harness.pick(20, 200))
    rejections: list[tuple[float, int]] = []
    with trio.fail_after(25):
        async with server_with(tmp_path, case.config) as server:
            async with connect(server, case.client) as admin:
                await natrio.provision(admin, worker_ttl=2.0)
                async with (
                    connect(server, case.worker, name="auth-worker") as worker_nc,
                    connect(server, case.client, name="auth-client") as client_nc,
                ):
                    assert_not_leaked(case.secrets, [worker_nc.url, client_nc.url])
                    assert await run_tasks(worker_nc, client_nc, items) == expected(items)
                outcomes = await harness.outcomes(admin, TASK_TYPE)

            for wrong in case.wrong:
                error, elapsed, attempts = await attempt_wrong(server, case, wrong)
                slow = f"{case.fault}: ConnectError after {elapsed:.2f}s, {attempts} attempts"
                assert elapsed < wrong.bound, slow
                assert 1 <= attempts <= wrong.max_attempts, slow
                assert f"127.0.0.1:{server.port}" in str(error)
                assert case.reason.lower() in str(error).lower()
                assert_not_leaked(case.secrets, exception_texts(error))
                rejections.append((elapsed, attempts))
    assert_not_leaked(case.secrets, [caplog.text])
    assert_not_leaked(case.secrets, (record.getMessage() for record in caplog.records))

    assert outcomes.completed == len(items)
    assert outcomes.duplicates == 0
    worst = max(rejections)
    harness.report(
        harness.ScenarioResult(
            scenario=case.scenario,
            load=f"{len(items)} tasks, 1 retried",
            faults=case.fault,
            submitted=len(items),
            completed=outcomes.completed,
            dead_lettered=outcomes.dead,
            lost=len(items) - outcomes.completed - outcomes.dead,
            duplicate_completions=outcomes.duplicates,
            notes=(
                f"wrong credentials: ConnectError in {worst[0]:.2f}s after {worst[1]} attempt(s); "
                "no credential in errors or logs"
            ),
        )
    )


async def test_url_password_with_at_sign_is_redacted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (fixed in cfb1c5c): redaction stopped at the first '@' of a password, so
    nats://alice:pa@ss@host showed as nats://***@ss@host in Connection.url, ConnectError
    and the 'disconnected from' log line."""
    caplog.set_level(logging.DEBUG)
    password, wrong = "pa@ss-Kx81-right", "pa@ss-Qz27-wrong"
    texts: list[str] = []
    with trio.fail_after(10):
        async with server_with(tmp_path, authorization([("alice", password, None)])) as server:
            async with connect(server, Endpoint(userinfo=f"alice:{password}")) as nc:
                texts.append(nc.url)
            with pytest.raises(natrio.ConnectError) as info:
                async with connect(server, Endpoint(userinfo=f"alice:{wrong}")):
                    pass
            texts += exception_texts(info.value)
    texts.append(caplog.text)
    assert_not_leaked(["Kx81-right", "Qz27-wrong"], texts)


def test_cli_does_not_print_url_credentials(tmp_path: Path) -> None:
    password = "cli-Zt55-right"
    config = tmp_path / "nats-server.conf"
    config.write_text(authorization([("admin", password, None)]), encoding="utf-8")
    runner = CliRunner(env={"NATRIO_URL": None})
    outputs: list[str] = []
    with natrio.EmbeddedServer(args=["-c", str(config)]) as server:
        url = Endpoint(userinfo=f"admin:{password}").url(server)
        for command in ("provision", "workers"):
            result = runner.invoke(cli, [command, "--url", url, "--connect-timeout", "5"])
            assert result.exit_code == 0, (result.exception, result.output)
            outputs += [result.stdout, result.stderr]
    assert_not_leaked([password], outputs)


# -- permissions ------------------------------------------------------------------------

ADMIN = Endpoint(options={"user": "admin", "password": "admin-Ro83"})
RESIZE_WORKER = Endpoint(
    options={"user": "resize-worker", "password": "worker-Pe19", "inbox_prefix": WORKER_INBOX}
)
RESIZE_CLIENT = Endpoint(
    options={"user": "resize-client", "password": "client-Vu40", "inbox_prefix": CLIENT_INBOX}
)
RESIZE_INSPECTOR = Endpoint(
    options={
        "user": "resize-inspector",
        "password": "inspector-Lo62",
        "inbox_prefix": INSPECTOR_INBOX,
    }
)


def permissions_config(worker: Permissions = WORKER_PERMISSIONS) -> str:
    return authorization(
        [
            ("admin", ADMIN.options["password"], None),
            ("resize-worker", RESIZE_WORKER.options["password"], worker),
            ("resize-client", RESIZE_CLIENT.options["password"], CLIENT_PERMISSIONS),
            ("resize-inspector", RESIZE_INSPECTOR.options["password"], INSPECTOR_PERMISSIONS),
        ]
    )


async def refused(call: Any, *args: Any) -> bool:
    """Whether ``call(*args)`` got no answer within DENIED_WAIT: the server dropped it."""
    try:
        with trio.move_on_after(DENIED_WAIT):
            await call(*args)
            return False
    except natrio.RequestTimeout:
        return True
    except natrio.NatrioError:
        return False  # an answer, even an error, means the request got through
    return True


async def pull_one(nc: natrio.Connection, consumer: str) -> natrio.Message | None:
    """One message pulled from ``consumer`` of the task stream, or None within DENIED_WAIT."""
    inbox = await nc.subscribe(nc.new_inbox())
    async with inbox:
        body = {"batch": 1, "expires": int(DENIED_WAIT * 1e9)}
        nc.publish_nowait(
            f"$JS.API.CONSUMER.MSG.NEXT.NATRIO_TASKS.{consumer}",
            json.dumps(body).encode(),
            reply=inbox.subject,
        )
        with trio.move_on_after(DENIED_WAIT):
            async for msg in inbox:
                if msg.status is None:
                    return msg
    return None


async def serve_other_type_once(admin: natrio.Connection) -> None:
    """Create OTHER_TYPE's consumer the way a worker does, then leave one task pending on it."""
    other = natrio.Worker(admin, shutdown_grace=0)
    other.handle(OTHER_TYPE, shout)
    async with natrio.open_worker(other, grace=0):
        pass
    await natrio.Client(admin).submit(OTHER_TYPE, b"another type's input")


async def test_permissions_one_task_type(tmp_path: Path) -> None:
    items = inputs(harness.pick(12, 100), doomed=True)
    other_consumer = f"{OTHER_TYPE}~{GROUP}"
    with trio.fail_after(25):
        async with (
            server_with(tmp_path, permissions_config()) as server,
            connect(server, ADMIN) as admin,
        ):
            await natrio.provision(admin, worker_ttl=2.0)
            await serve_other_type_once(admin)
            async with (
                connect(server, RESIZE_WORKER, name="resize-worker") as worker_nc,
                connect(server, RESIZE_CLIENT, name="resize-client") as client_nc,
            ):
                assert await run_tasks(worker_nc, client_nc, items) == expected(items)
                # The lists are sufficient: the whole run, retries and a dead letter
                # included, caused no violation.
                assert violations(server, "resize-worker") == []
                assert violations(server, "resize-client") == []

                # ... and another task type is out of reach, for both users.
                worker_js = JetStream(worker_nc, timeout=DENIED_WAIT)
                client_js = JetStream(client_nc, timeout=DENIED_WAIT)
                task_subject = f"natrio.task.{OTHER_TYPE}.{GROUP}.probe.probe"
                probes = {
                    # submit() looks up the type's partition count first, refused too
                    "worker submits": (
                        natrio.Client(worker_nc, timeout=DENIED_WAIT).submit,
                        OTHER_TYPE,
                    ),
                    "client submits": (
                        natrio.Client(client_nc, timeout=DENIED_WAIT).submit,
                        OTHER_TYPE,
                    ),
                    "worker publishes a task": (worker_js.publish, task_subject, b""),
                    "client publishes a task": (client_js.publish, task_subject, b""),
                    "worker reads consumer": (
                        worker_js.consumer_info,
                        "NATRIO_TASKS",
                        other_consumer,
                    ),
                    "worker creates consumer": (
                        worker_js.ensure_consumer,
                        "NATRIO_TASKS",
                        {"durable_name": other_consumer, "ack_policy": "explicit"},
                    ),
                    "client reads task stream": (client_js.stream_info, "NATRIO_TASKS"),
                }
                results: dict[str, bool] = {}

                async def probe(name: str, call: Any, *args: Any) -> None:
                    results[name] = await refused(call, *args)

                stolen: list[natrio.Message | None] = []

                async def pull() -> None:
                    stolen.append(await pull_one(worker_nc, other_consumer))

                async with trio.open_nursery() as nursery:
                    for name, (call, *args) in probes.items():
                        nursery.start_soon(probe, name, call, *args)
                    nursery.start_soon(pull)
                    # Eavesdropping: other users' inboxes, task subjects, other types' events.
                    await worker_nc.subscribe("_INBOX.>")
                    await worker_nc.subscribe(f"{CLIENT_INBOX}.>")
                    await worker_nc.subscribe(f"natrio.task.{OTHER_TYPE}.>")
                    await client_nc.subscribe(f"natrio.event.{OTHER_TYPE}.>")
                    await client_nc.subscribe(f"{WORKER_INBOX}.>")
                assert results == dict.fromkeys(probes, True)
                assert stolen == [None]

            await settle(lambda: len(violations(server, "resize-worker")) >= 7)
            worker_denied = violations(server, "resize-worker")
            client_denied = violations(server, "resize-client")
            lookup = (
                "Publish Violation - Subject "
                f'"$JS.API.DIRECT.GET.KV_natrio_routing.$KV.natrio_routing.partitions.{OTHER_TYPE}"'
            )
            for wanted in (
                f'Publish Violation - Subject "natrio.task.{OTHER_TYPE}.{GROUP}.',
                lookup,
                f'Publish Violation - Subject "$JS.API.CONSUMER.INFO.NATRIO_TASKS.{other_consumer}"',
                f'Publish Violation - Subject "$JS.API.CONSUMER.CREATE.NATRIO_TASKS.{other_consumer}"',
                f'Publish Violation - Subject "$JS.API.CONSUMER.MSG.NEXT.NATRIO_TASKS.{other_consumer}"',
                'Subscription Violation - Subject "_INBOX.>"',
                f'Subscription Violation - Subject "{CLIENT_INBOX}.>"',
                f'Subscription Violation - Subject "natrio.task.{OTHER_TYPE}.>"',
            ):
                assert any(line.startswith(wanted) for line in worker_denied), (
                    wanted,
                    worker_denied,
                )
            for wanted in (
                f'Publish Violation - Subject "natrio.task.{OTHER_TYPE}.{GROUP}.',
                lookup,
                'Publish Violation - Subject "$JS.API.STREAM.INFO.NATRIO_TASKS"',
                f'Subscription Violation - Subject "natrio.event.{OTHER_TYPE}.>"',
                f'Subscription Violation - Subject "{WORKER_INBOX}.>"',
            ):
                assert any(line.startswith(wanted) for line in client_denied), (
                    wanted,
                    client_denied,
                )

            # The other type's task is where it was: not delivered, not taken.
            left = await harness.pending(admin, OTHER_TYPE)
            assert left == {"ack_pending": 0, "pending": 1}
            outcomes = await harness.outcomes(admin, TASK_TYPE)

    assert outcomes.completed == len(items) - 1
    assert outcomes.dead == 1
    assert outcomes.duplicates == 0
    harness.report(
        harness.ScenarioResult(
            scenario="Auth: one-type permissions",
            load=f"{len(items)} tasks by a restricted worker and client, 1 retried, 1 fatal",
            faults=f"{len(probes) + 6} attempts on another type's tasks, consumer and inboxes",
            submitted=len(items),
            completed=outcomes.completed,
            dead_lettered=outcomes.dead,
            lost=len(items) - outcomes.completed - outcomes.dead,
            duplicate_completions=outcomes.duplicates,
            notes="all refused by the server; no violation in normal operation",
        )
    )


async def test_worker_user_cannot_repoint_its_consumer(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with (
            server_with(tmp_path, permissions_config()) as server,
            connect(server, ADMIN) as admin,
        ):
            await natrio.provision(admin, worker_ttl=2.0)
            await natrio.Client(admin).submit(OTHER_TYPE, b"another type's input")
            async with connect(server, RESIZE_WORKER) as worker_nc:
                hijack = {
                    "durable_name": f"{TASK_TYPE}~{GROUP}",
                    "filter_subject": f"natrio.task.{OTHER_TYPE}.>",
                    "ack_policy": "explicit",
                }
                try:
                    await JetStream(worker_nc, timeout=DENIED_WAIT).ensure_consumer(
                        "NATRIO_TASKS", hijack
                    )
                    repointed = True
                except natrio.NatrioError:  # refused (RequestTimeout) or rejected
                    repointed = False
                stolen = await pull_one(worker_nc, f"{TASK_TYPE}~{GROUP}")
    assert not repointed, "the worker user re-pointed its consumer at another task type"
    assert stolen is None, f"the worker user pulled another type's task: {stolen!r}"


async def test_client_user_cannot_read_other_types_results(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with (
            server_with(tmp_path, permissions_config()) as server,
            connect(server, ADMIN) as admin,
        ):
            await natrio.provision(admin, worker_ttl=2.0)
            other = natrio.Worker(admin, shutdown_grace=0)

            @other.handle(OTHER_TYPE)
            async def secret(ctx: natrio.TaskContext) -> bytes:
                return b"another type's output"

            async with natrio.open_worker(other, grace=0):
                await (await natrio.Client(admin).submit(OTHER_TYPE)).result()
            async with connect(server, RESIZE_CLIENT) as client_nc:
                got = None
                with trio.move_on_after(DENIED_WAIT):
                    got = await client_nc.request(
                        "$JS.API.DIRECT.GET.NATRIO_EVENTS",
                        json.dumps({"last_by_subj": f"natrio.event.{OTHER_TYPE}.>"}).encode(),
                    )
    assert got is None or got.data != b"another type's output"


async def test_worker_missing_a_permission_fails_instead_of_hanging(tmp_path: Path) -> None:
    """A worker whose user may not write its directory entry fails in run(), within bounds.

    Regression (fixed in cfb1c5c): when registering failed, run() never returned: the
    dispatcher's shielded keep-alive scope was only cancelled by _shutdown(), which was not
    reached, so not even the caller's cancel scope could end it.
    """
    config = permissions_config(WORKER_PERMISSIONS.without("$KV.natrio_workers.>"))
    errors: list[BaseException] = []
    hung = False
    with trio.fail_after(15):
        async with (
            server_with(tmp_path, config) as server,
            connect(server, ADMIN) as admin,
        ):
            await natrio.provision(admin, worker_ttl=2.0)
            async with connect(server, RESIZE_WORKER) as worker_nc:
                worker = natrio.Worker(worker_nc, shutdown_grace=0)
                worker.handle(TASK_TYPE, shout)
                finished = trio.Event()

                async def run() -> None:
                    try:
                        await worker.run()
                    except Exception as exc:
                        errors.append(exc)
                    finally:
                        finished.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run)
                    with trio.move_on_after(8):  # the directory write times out after 5 s
                        await finished.wait()
                    if not finished.is_set():
                        hung = True
                        # Rescue, so that this test (and its server) can end.
                        assert worker._dispatcher is not None
                        worker._dispatcher._keep_alive_scope.cancel()
    assert not hung, "Worker.run() hung after failing to register"
    assert errors
    assert isinstance(errors[0], natrio.NatrioError)


# What a submitter might put in Natrio-Reply to have the worker publish there with its own
# permissions. The first is outside the worker's permissions (the server would refuse it
# and log a violation); the others are inside them: a key of natrio_checkpoints, another
# run's checkpoint, another step's outcome. Only natrio's reply rule keeps the worker off
# those.
STEERED_REPLIES = {
    "delete-events": "$JS.API.STREAM.DELETE.NATRIO_EVENTS",
    "kv-x": "$KV.natrio_checkpoints.x",
    "kv-victim": "$KV.natrio_checkpoints.victim.step",
    "forged-event": f"natrio.event.{TASK_TYPE}.victim.step.completed",
}


async def completed_output(js: JetStream, run_id: str) -> bytes:
    """The output in the completion event of ``run_id`` (step TASK_TYPE), once there is one."""
    subject = f"natrio.event.{TASK_TYPE}.{run_id}.{TASK_TYPE}.completed"
    # Polled (ASYNC110): what counts is the event the stream stored, not one seen live.
    while (msg := await js.last_message("NATRIO_EVENTS", subject)) is None:  # noqa: ASYNC110
        await trio.sleep(0.05)
    return msg.data


def drained(sub: natrio.Subscription) -> list[natrio.Message]:
    """The messages waiting in ``sub``."""
    out = []
    while True:
        try:
            out.append(sub.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_a_submitter_cannot_steer_where_the_worker_publishes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Confused deputy: a task's Natrio-Reply cannot make the worker publish anywhere but
    under its own inbox prefix, whatever the worker's permissions allow.

    The worker runs under its documented minimal permissions and the submitter under the
    client's (submit only); the submitter publishes tasks by hand with a Natrio-Reply
    from STEERED_REPLIES. Each task completes (its outcome is in the events stream), no
    reply goes out, and the worker causes no violation; NATRIO_EVENTS still exists, and
    nothing is published on any of those subjects. Beside them, a normal submit is
    answered directly (the clients' inboxes are under the worker's prefix), the worker
    overhears nothing of the clients' inboxes, and a dead letter too large for its entry
    keeps its input in natrio_dead_inputs, readable with the inspector's permissions.
    """
    caplog.set_level(logging.WARNING, logger="natrio.task")
    large = b"doomed " + b"x" * 900_000
    with trio.fail_after(25):
        async with (
            server_with(tmp_path, permissions_config()) as server,
            connect(server, ADMIN) as admin,
        ):
            await natrio.provision(admin, worker_ttl=2.0)
            admin_js = JetStream(admin)
            # Whatever is published on a target subject reaches these.
            watchers = [await admin.subscribe(target) for target in STEERED_REPLIES.values()]
            async with (
                connect(server, RESIZE_WORKER, name="resize-worker") as worker_nc,
                connect(server, RESIZE_CLIENT, name="resize-client") as client_nc,
                connect(server, RESIZE_INSPECTOR, name="resize-inspector") as inspector_nc,
            ):
                # The widest subscription the worker may make: the server holds back what
                # goes to the clients' inboxes (the deny list).
                overheard = await worker_nc.subscribe(f"{WORKER_INBOX}.>")
                worker = natrio.Worker(worker_nc, shutdown_grace=0)
                worker.handle(TASK_TYPE, shout)
                # No look-ups in the events stream for a minute: a result must be the reply.
                client = natrio.Client(client_nc, check_interval=60.0)
                submitter = JetStream(client_nc)
                async with natrio.open_worker(worker, grace=0):
                    for run_id, target in STEERED_REPLIES.items():
                        await submitter.publish(
                            f"natrio.task.{TASK_TYPE}.{GROUP}.{run_id}.{TASK_TYPE}",
                            run_id.encode(),
                            headers={"Nats-Msg-Id": f"steered:{run_id}", "Natrio-Reply": target},
                        )
                    with trio.fail_after(5):
                        plain = await (await client.submit(TASK_TYPE, b"plain")).result()
                        with pytest.raises(natrio.TaskFailed) as failed:
                            await (await client.submit(TASK_TYPE, large)).result()
                        outputs = {
                            run_id: await completed_output(admin_js, run_id)
                            for run_id in STEERED_REPLIES
                        }
                inspector = natrio.Client(inspector_nc)
                [entry] = [
                    e async for e in inspector.dead_letters(TASK_TYPE) if e.run_id != "victim"
                ]
                stored_input = await inspector.dead_letter_input(entry)
                await admin.flush()
                await trio.sleep(0.2)  # anything the worker published has arrived by now
                heard = [msg.subject for msg in drained(overheard)]

            events_stream = await admin_js.stream_info("NATRIO_EVENTS")
            checkpoint_keys = await admin_js.subjects(
                "KV_natrio_checkpoints", "$KV.natrio_checkpoints.>"
            )
            forged = await admin_js.subjects("NATRIO_EVENTS", f"natrio.event.{TASK_TYPE}.victim.>")
            published = [msg.subject for sub in watchers for msg in drained(sub)]
            worker_denied = violations(server, "resize-worker")
            others_denied = violations(server, "resize-client") + violations(
                server, "resize-inspector"
            )
            outcomes = await harness.outcomes(admin, TASK_TYPE)

    assert outputs == {run_id: run_id.upper().encode() for run_id in STEERED_REPLIES}
    assert plain == b"PLAIN"
    assert failed.value.error.kind == "fatal"
    assert events_stream["config"]["name"] == "NATRIO_EVENTS"
    assert "$KV.natrio_checkpoints.x" not in checkpoint_keys
    assert "$KV.natrio_checkpoints.victim.step" not in checkpoint_keys
    assert forged == {}
    assert published == [], "the worker published on a subject a task named"
    assert worker_denied == [], "the worker tried to publish where it may not"
    assert others_denied == []
    refusals = [r.getMessage() for r in caplog.records if "not answering" in r.getMessage()]
    assert len(refusals) == len(STEERED_REPLIES)
    assert not [s for s in heard if s.startswith(CLIENT_INBOX + ".")], heard
    assert entry.input == b""
    assert entry.input_ref is not None
    assert stored_input == large
    assert outcomes.duplicates == 0
    harness.report(
        harness.ScenarioResult(
            scenario="Auth: replies a submitter steers",
            load=f"{len(STEERED_REPLIES) + 2} tasks by a restricted worker and submitter",
            faults=f"{len(STEERED_REPLIES)} tasks with a Natrio-Reply outside the inbox prefix",
            submitted=len(STEERED_REPLIES) + 2,
            completed=outcomes.completed,
            dead_lettered=outcomes.dead,
            lost=len(STEERED_REPLIES) + 2 - outcomes.completed - outcomes.dead,
            duplicate_completions=outcomes.duplicates,
            notes="outcomes recorded, no reply sent, nothing published on the steered subjects",
        )
    )


def test_permissions_page_lists_the_tested_subjects() -> None:
    """docs/permissions.md shows exactly the subjects this scenario proved sufficient."""
    page = DOCS_PAGE.read_text(encoding="utf-8")
    for subject in (
        *WORKER_PERMISSIONS.publish,
        *WORKER_PERMISSIONS.subscribe,
        *WORKER_PERMISSIONS.subscribe_deny,
        *CLIENT_PERMISSIONS.publish,
        *CLIENT_PERMISSIONS.subscribe,
    ):
        assert f'"{subject}"' in page, subject
    # The optional features' table names its subjects in backquotes.
    for subject in INSPECTOR_PERMISSIONS.publish:
        assert f"`{subject}`" in page, subject
    for prefix in (WORKER_INBOX, CLIENT_INBOX):
        assert f'inbox_prefix="{prefix}"' in page, prefix
