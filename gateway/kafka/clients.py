"""The one place that makes Kafka clients: every consumer, producer and admin client of the
package comes from here, so TLS, SASL and the no-auto-create rule reach all of them alike.

A client that cannot start says why in one line (KafkaAccessError): the broker is unreachable,
its certificate is not trusted, or SASL refused the credentials. aiokafka itself only says
"Unable to bootstrap"; the reason is found by one direct connection attempt with the same
settings (diagnose), made only after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import types
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    UnsupportedSaslMechanismError,
)

from .config import KafkaConfig, parse_hostport

DIAGNOSE_TIMEOUT_S = 5.0


class KafkaAccessError(KafkaConnectionError):
    """A client could not start; str() is one line naming the cause (never the password)."""

    def __str__(self) -> str:  # aiokafka's errors prefix their class name
        return str(self.args[0]) if self.args else "Kafka cannot be used"


def _metadata_update_without_auto_create():
    """aiokafka's AIOKafkaClient._metadata_update, asking with allow_auto_topic_creation=false."""
    import aiokafka.client
    from aiokafka.protocol.metadata import MetadataRequest

    class NoAutoCreate(MetadataRequest):
        def __init__(self, topics=None, allow_auto_topic_creation=False):
            super().__init__(topics, allow_auto_topic_creation)

    method = aiokafka.client.AIOKafkaClient._metadata_update
    names = {**method.__globals__, "MetadataRequest": NoAutoCreate}
    return types.FunctionType(method.__code__, names, method.__name__, method.__defaults__, method.__closure__)


_METADATA_UPDATE = _metadata_update_without_auto_create()

Client = TypeVar("Client", AIOKafkaConsumer, AIOKafkaProducer)


def no_auto_create(client: Client) -> Client:
    """Make a client's metadata requests never create a topic (DESIGN invariant 7, issue 10).

    aiokafka asks with allow_auto_topic_creation=true; a broker that honours it (Tansu, Kafka with
    auto.create.topics.enable) recreated a reset commands topic with its defaults (4 partitions) the
    moment the materializer's subscription refreshed its metadata. Topics are made by ensure_topics
    only; a missing topic is an error the reader reports and retries. Every client this package
    makes goes through here; other clients in the process keep aiokafka's behaviour.
    """
    # aiokafka has no option for it: rebind the one method that asks, on this client only.
    inner = client.client if isinstance(client, AIOKafkaProducer) else client._client
    inner._metadata_update = types.MethodType(_METADATA_UPDATE, inner)
    return client


# -- security settings -------------------------------------------------------------------------


def ssl_context(kafka: KafkaConfig) -> ssl.SSLContext | None:
    """The TLS context of every connection (None without TLS): the CA file or the system's trust
    store, the client certificate for mutual TLS, hostname verification unless turned off."""
    if not kafka.uses_tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=kafka.ssl_cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if kafka.ssl_certfile:
        context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile)
    context.check_hostname = kafka.ssl_check_hostname  # verify_mode stays CERT_REQUIRED either way
    return context


class _Redact(logging.Filter):
    """Blank the SASL password in aiokafka's own log records (its DEBUG lines print each request,
    and a PLAIN authentication request carries the password in clear)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if self.secret in text:
            record.msg, record.args = text.replace(self.secret, "***"), ()
        return True


_REDACTED: set[str] = set()


def _redact_password(kafka: KafkaConfig) -> None:
    if kafka.sasl_password and kafka.sasl_password not in _REDACTED:
        _REDACTED.add(kafka.sasl_password)
        for name in ("aiokafka", "aiokafka.conn", "aiokafka.client"):
            logging.getLogger(name).addFilter(_Redact(kafka.sasl_password))


def security_settings(kafka: KafkaConfig) -> dict[str, Any]:
    """The aiokafka keyword arguments of every client for these settings."""
    settings: dict[str, Any] = {"security_protocol": kafka.security_protocol, "ssl_context": ssl_context(kafka)}
    if kafka.uses_sasl:
        _redact_password(kafka)
        settings.update(sasl_mechanism=kafka.sasl_mechanism, sasl_plain_username=kafka.sasl_username,
                        sasl_plain_password=kafka.sasl_password)
    return settings


# -- the clients --------------------------------------------------------------------------------


def consumer(kafka: KafkaConfig, client_id: str, **settings: Any) -> AIOKafkaConsumer:
    """A consumer (no topic subscribed: callers assign or subscribe) that never auto-creates topics."""
    return _explained(kafka, no_auto_create(AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap, client_id=client_id, **security_settings(kafka), **settings)))


def producer(kafka: KafkaConfig, client_id: str, **settings: Any) -> AIOKafkaProducer:
    """A producer that never auto-creates topics."""
    return _explained(kafka, no_auto_create(AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, client_id=client_id, **security_settings(kafka), **settings)))


def admin_client(kafka: KafkaConfig, client_id: str = "gateway-topics") -> AIOKafkaAdminClient:
    """An admin client (topic creation and description)."""
    return _explained(kafka, AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap, client_id=client_id, **security_settings(kafka)))


def log_reader(kafka: KafkaConfig, client_id: str, *, fetch_max_wait_ms: int = 50, reset: str = "earliest") -> AIOKafkaConsumer:
    """A consumer that reads whole topics by assignment (no group, no commits), committed
    records only, in large fetches: what bootstrapping, recovery and replay need.

    `reset="none"`: a position out of the topic's range raises instead of jumping to its start
    (a follower must notice a reset log, never read it on top of the old one)."""
    return consumer(
        kafka, client_id,
        enable_auto_commit=False,
        auto_offset_reset=reset,
        isolation_level="read_committed",
        fetch_max_wait_ms=fetch_max_wait_ms,
        max_partition_fetch_bytes=16 << 20,
        fetch_max_bytes=64 << 20,
    )


Startable = TypeVar("Startable", AIOKafkaConsumer, AIOKafkaProducer, AIOKafkaAdminClient)

# Per cluster settings, the outcome of the latest client start in this process: None when it
# connected, else the line that says why not. Long-running processes report it while they retry.
_LAST_START: dict[KafkaConfig, str | None] = {}


def kafka_problem(kafka: KafkaConfig) -> str | None:
    """Why the latest Kafka client this process started with these settings could not connect
    (None: it did, or none was started yet)."""
    return _LAST_START.get(kafka)


def _explained(kafka: KafkaConfig, client: Startable) -> Startable:
    """Make the client's start() fail with one line naming the cause (KafkaAccessError).

    aiokafka folds every bootstrap failure into "Unable to bootstrap" (and lets a SCRAM
    exchange the broker broke off escape as KeyError): after such a failure, one direct
    connection with the same settings finds out which it was."""
    start: Callable[[], Awaitable[None]] = client.start

    @functools.wraps(start)
    async def explained_start() -> None:
        try:
            await start()
        except (KafkaConnectionError, OSError, KeyError, ValueError) as exc:
            line = await diagnose(kafka)
            with contextlib.suppress(Exception, asyncio.TimeoutError):
                await _close(client)
            line = line or f"cannot start a Kafka client on {kafka.bootstrap}: {_safe(kafka, exc)}"
            _LAST_START[kafka] = line
            raise KafkaAccessError(line) from None
        _LAST_START[kafka] = None

    client.start = explained_start  # type: ignore[method-assign]
    return client


async def _close(client: Any) -> None:
    closer = getattr(client, "stop", None) or getattr(client, "close")
    await asyncio.wait_for(closer(), 2.0)


# -- why a connection fails ---------------------------------------------------------------------


async def diagnose(kafka: KafkaConfig, timeout: float = DIAGNOSE_TIMEOUT_S) -> str | None:
    """Connect to each bootstrap server with the configured TLS and SASL settings; return one
    line naming why none could be used (unreachable, untrusted certificate, refused credentials),
    or None when one answered and authenticated."""
    problems: list[str] = []
    for server in kafka.bootstrap.split(","):
        host, port = parse_hostport(server.strip())
        try:
            conn = await asyncio.wait_for(create_conn(
                host, port, client_id="gateway-diagnose", request_timeout_ms=int(timeout * 1000),
                **security_settings(kafka)), timeout)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is a reason to name
            problems.append(explain(kafka, server.strip(), exc))
            continue
        conn.close()
        return None
    return problems[0] if len(problems) == 1 else "; ".join(problems)


def explain(kafka: KafkaConfig, server: str, exc: BaseException) -> str:
    """One line for one failed connection to `server`: which of the three it was, and what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if "hostname" in (exc.verify_message or "") or "IP address mismatch" in (exc.verify_message or ""):
            return (f"Kafka at {server}: the broker's TLS certificate does not name {server.rsplit(':', 1)[0]}"
                    f" ({exc.verify_message}): connect by the name in its certificate")
        return (f"Kafka at {server}: the broker's TLS certificate is not trusted ({exc.verify_message}):"
                f" check --kafka-ssl-cafile ({kafka.ssl_cafile or 'system trust store'})")
    if isinstance(exc, ssl.SSLError):
        return (f"Kafka at {server}: TLS handshake failed ({exc.reason or exc}): is it a TLS listener, and does it"
                " want a client certificate (--kafka-ssl-certfile/--kafka-ssl-keyfile)?")
    if isinstance(exc, UnsupportedSaslMechanismError):
        return (f"Kafka at {server}: SASL mechanism {kafka.sasl_mechanism} is not enabled on this listener"
                " (check --kafka-sasl-mechanism and --kafka-security-protocol)")
    if kafka.uses_sasl and isinstance(exc, KafkaConnectionError) and "closed" in str(exc):
        return (f"Kafka at {server} closed the connection during SASL {kafka.sasl_mechanism} authentication of user"
                f" {kafka.sasl_username!r}: wrong username or password, or a mechanism the listener does not enable?")
    if kafka.uses_sasl and isinstance(exc, (KafkaError, KeyError, ValueError)) and _connected_before(exc):
        return (f"Kafka at {server}: SASL {kafka.sasl_mechanism} authentication failed for user"
                f" {kafka.sasl_username!r}: wrong username or password?")
    if isinstance(exc, KafkaConnectionError) and "closed" in str(exc):  # TCP worked; the broker hung up
        if kafka.uses_tls and not kafka.ssl_certfile:
            return (f"Kafka at {server} closed the TLS connection: it wants a client certificate"
                    " (--kafka-ssl-certfile and --kafka-ssl-keyfile)")
        if kafka.uses_tls:
            return (f"Kafka at {server} closed the TLS connection: is the client certificate"
                    f" ({kafka.ssl_certfile}) signed by a CA the broker trusts?")
        return (f"Kafka at {server} closed the connection before answering: is it a TLS listener"
                " (--kafka-security-protocol SSL or SASL_SSL)?")
    if isinstance(exc, (OSError, asyncio.TimeoutError, TimeoutError, KafkaConnectionError)):
        return f"cannot connect to Kafka at {server}: is the broker running and --kafka (GATEWAY_KAFKA) right?"
    return f"Kafka at {server}: {_safe(kafka, exc)}"


def _connected_before(exc: BaseException) -> bool:
    """True for failures that happen after TCP (and TLS) succeeded: during the SASL exchange
    (a broker's SASL error code, or aiokafka's SCRAM parser on a server message that refuses
    instead of answering); not for a connection that could not be made."""
    return not isinstance(exc, KafkaConnectionError)


def _safe(kafka: KafkaConfig, exc: BaseException) -> str:
    """An exception's text with the password blanked, should a library ever echo it."""
    text = str(exc) or type(exc).__name__
    if kafka.sasl_password:
        text = text.replace(kafka.sasl_password, "***")
    return text
