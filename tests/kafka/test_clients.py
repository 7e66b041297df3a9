"""The one place that makes Kafka clients (gateway/kafka/clients.py) and the settings that feed it.

What reaches aiokafka is read back from the client objects (the settings' wiring); SASL is
exercised for real against Tansu started with `--authentication` (SCRAM required). Tansu cannot
create a user on such a broker (its `tansu user create` is refused as not authenticated, and the
memory storage loses a user made before a restart), so no successful SASL login is tested here:
every attempt is a real handshake that the broker refuses, and the refusal must be one line that
names it, with the password in no output at all.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import click
import pytest
import trustme
from helpers import wait_until
from liveserve import gateway_process

from gateway.broker import Broker, start_broker
from gateway.cli import kafka_config
from gateway.kafka import clients
from gateway.kafka.config import KafkaConfig, KafkaSettingsError

PASSWORD = "pw-7f3a9c1e-never-print-me"


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def sasl_ssl(ca_file: Path, **overrides) -> KafkaConfig:
    settings = dict(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="gateway",
                    sasl_password=PASSWORD, ssl_cafile=str(ca_file))
    return KafkaConfig("127.0.0.1:9093", **{**settings, **overrides})


@pytest.fixture
async def made() -> AsyncIterator[list]:
    """The clients a test made, stopped (never started) at its end."""
    made: list = []
    yield made
    for client in made:
        await (client.close() if hasattr(client, "close") and not hasattr(client, "stop") else client.stop())


def inner_clients(kafka: KafkaConfig, made: list) -> dict:
    """The AIOKafkaClient inside each kind of client the package makes."""
    consumer, reader = clients.consumer(kafka, "t"), clients.log_reader(kafka, "t")
    producer, admin = clients.producer(kafka, "t"), clients.admin_client(kafka)
    made += [consumer, reader, producer, admin]
    return {"consumer": consumer._client, "log_reader": reader._client, "producer": producer.client,
            "admin": admin._client}


async def test_every_kind_of_client_gets_the_tls_and_sasl_settings(ca_file: Path, made: list) -> None:
    for kind, inner in inner_clients(sasl_ssl(ca_file), made).items():
        assert (inner._security_protocol, inner._sasl_mechanism, inner._sasl_plain_username,
                inner._sasl_plain_password) == ("SASL_SSL", "SCRAM-SHA-512", "gateway", PASSWORD), kind
        context = inner._ssl_context
        assert isinstance(context, ssl.SSLContext), kind
        assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True), kind
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert [c["subject"] for c in context.get_ca_certs()] == [c["subject"] for c in _ca_of(ca_file)], kind


def _ca_of(path: Path) -> list[dict]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(path))
    return context.get_ca_certs()


async def test_plaintext_clients_carry_no_tls_and_no_sasl(made: list) -> None:
    for kind, inner in inner_clients(KafkaConfig("127.0.0.1:9092"), made).items():
        assert (inner._security_protocol, inner._ssl_context, inner._sasl_plain_password) == ("PLAINTEXT", None, None), kind


async def test_hostname_verification_is_turned_off_only_when_asked(ca_file: Path, made: list) -> None:
    context = inner_clients(sasl_ssl(ca_file, ssl_check_hostname=False), made)["consumer"]._ssl_context
    assert (context.check_hostname, context.verify_mode) == (False, ssl.CERT_REQUIRED)  # the CA is still checked


async def test_every_client_is_kept_from_creating_topics(ca_file: Path, made: list) -> None:
    for kind, inner in inner_clients(sasl_ssl(ca_file), made).items():
        if kind != "admin":
            assert inner._metadata_update.__func__ is clients._METADATA_UPDATE, kind


def test_the_password_is_not_in_the_repr_of_the_settings(ca_file: Path) -> None:
    kafka = sasl_ssl(ca_file)
    assert PASSWORD not in repr(kafka) and PASSWORD not in str(kafka) and "gateway" in repr(kafka)


@pytest.mark.parametrize("settings, says", [
    (dict(security_protocol="TLS"), "security protocol must be one of"),
    (dict(ssl_cafile="ca.pem"), "CA file given, but security protocol PLAINTEXT does not use TLS"),
    (dict(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p",
          ssl_cafile="ca.pem"), "does not use TLS"),
    (dict(ssl_check_hostname=False), "hostname verification can only be turned off with TLS"),
    (dict(security_protocol="SSL", ssl_certfile="c.pem"), "needs both its certificate and its key"),
    (dict(sasl_username="u"), "SASL username given, but security protocol PLAINTEXT does not use SASL"),
    (dict(security_protocol="SSL", sasl_password="p"), "does not use SASL"),
    (dict(security_protocol="SASL_SSL", sasl_username="u", sasl_password="p"), "needs a SASL mechanism"),
    (dict(security_protocol="SASL_SSL", sasl_mechanism="GSSAPI", sasl_username="u", sasl_password="p"),
     "needs a SASL mechanism"),
    (dict(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_password="p"), "needs a SASL username"),
    (dict(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u"), "needs a SASL password"),
])
def test_settings_that_would_connect_with_less_than_asked_are_refused(settings: dict, says: str) -> None:
    with pytest.raises(KafkaSettingsError, match=says):
        KafkaConfig("127.0.0.1:9092", **settings)


# ------------------------------------------------------------- the command line's settings


SASL_FLAGS = dict(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-256", kafka_sasl_username="u")


def test_the_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_KAFKA_SASL_PASSWORD", PASSWORD)
    assert kafka_config("h:1", **SASL_FLAGS).sasl_password == PASSWORD


def test_the_password_comes_from_a_file_without_its_newline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GATEWAY_KAFKA_SASL_PASSWORD", raising=False)
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    assert kafka_config("h:1", **SASL_FLAGS, kafka_sasl_password_file=str(secret)).sasl_password == PASSWORD


def test_two_sources_of_the_password_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GATEWAY_KAFKA_SASL_PASSWORD", PASSWORD)
    secret = tmp_path / "password"
    secret.write_text("other")
    with pytest.raises(click.UsageError, match="one way"):
        kafka_config("h:1", **SASL_FLAGS, kafka_sasl_password_file=str(secret))


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}, **extra}


def gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
                          env=env or clean_env(), stdin=subprocess.DEVNULL)


def test_no_flag_takes_the_password() -> None:
    run = gateway("ctl", "--kafka", "127.0.0.1:1", "--kafka-sasl-password", PASSWORD, "replay", "--offset", "0")
    assert run.returncode == 2 and "No such option '--kafka-sasl-password'." in run.stderr


def test_sasl_without_a_password_is_a_usage_error_before_any_connection() -> None:
    run = gateway("ctl", "--kafka", "127.0.0.1:1", "--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-mechanism",
                  "PLAIN", "--kafka-sasl-username", "u", "replay", "--offset", "0")
    assert run.returncode == 2
    assert run.stderr.startswith("Error: Kafka settings: security protocol SASL_SSL needs a SASL password")


def test_every_kafka_setting_reads_one_global_variable() -> None:
    """Each security flag of every --kafka command reads the same GATEWAY_KAFKA_* name (pods set them once)."""
    from gateway.cli import cli

    wanted = {"kafka_security_protocol": "GATEWAY_KAFKA_SECURITY_PROTOCOL", "kafka_sasl_mechanism":
              "GATEWAY_KAFKA_SASL_MECHANISM", "kafka_sasl_username": "GATEWAY_KAFKA_SASL_USERNAME",
              "kafka_sasl_password_file": "GATEWAY_KAFKA_SASL_PASSWORD_FILE", "kafka_ssl_cafile":
              "GATEWAY_KAFKA_SSL_CAFILE", "kafka_ssl_certfile": "GATEWAY_KAFKA_SSL_CERTFILE", "kafka_ssl_keyfile":
              "GATEWAY_KAFKA_SSL_KEYFILE", "kafka_ssl_check_hostname": "GATEWAY_KAFKA_SSL_CHECK_HOSTNAME"}
    commands = [cli.commands["serve"], cli.commands["materialize"], cli.commands["ctl"]]
    for command in commands:
        found = {p.name: p.envvar for p in command.params if p.name in wanted}
        assert found == wanted, command.name


# ------------------------------------------------------------- a real SASL listener (Tansu --authentication)


@pytest.fixture(scope="module")
def sasl_broker() -> Iterator[Broker]:
    broker = start_broker(extra_args=("--authentication",))
    try:
        yield broker
    finally:
        broker.stop()


def sasl_env(broker: Broker, mechanism: str, **extra: str) -> dict[str, str]:
    return clean_env(GATEWAY_KAFKA=broker.bootstrap, GATEWAY_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
                     GATEWAY_KAFKA_SASL_MECHANISM=mechanism, GATEWAY_KAFKA_SASL_USERNAME="alice",
                     GATEWAY_KAFKA_SASL_PASSWORD=PASSWORD, **extra)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_a_refused_scram_login_is_one_line_naming_it(sasl_broker: Broker, mechanism: str, unique_topic) -> None:
    run = gateway("ctl", "--commands-topic", unique_topic("commands"), "blacklist", "10.0.0.0/8",
                  env=sasl_env(sasl_broker, mechanism))
    assert run.returncode == 1
    assert run.stderr.strip() == (f"Error: Kafka at {sasl_broker.bootstrap}: SASL {mechanism} authentication failed"
                                  " for user 'alice': wrong username or password? Nothing was published.")
    assert PASSWORD not in run.stdout + run.stderr


def test_a_mechanism_the_listener_refuses_is_one_line(sasl_broker: Broker, unique_topic) -> None:
    """Tansu offers SCRAM only; it hangs up on PLAIN."""
    run = gateway("ctl", "--commands-topic", unique_topic("commands"), "blacklist", "10.0.0.0/8",
                  env=sasl_env(sasl_broker, "PLAIN"))
    assert run.returncode == 1
    assert run.stderr.strip() == (f"Error: Kafka at {sasl_broker.bootstrap} closed the connection during SASL PLAIN"
                                  " authentication of user 'alice': wrong username or password, or a mechanism the"
                                  " listener does not enable? Nothing was published.")
    assert PASSWORD not in run.stdout + run.stderr


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "PLAIN"])
def test_the_password_is_in_no_log_line_even_at_debug(sasl_broker: Broker, mechanism: str, unique_topic,
                                                       tmp_path: Path) -> None:
    """materialize retries a refused login with one line per attempt; at DEBUG (aiokafka prints each
    request it sends, and PLAIN's carries the password) the password is still in no line."""
    log = tmp_path / "materialize.log"
    env = sasl_env(sasl_broker, mechanism, GATEWAY_LOG_LEVEL="DEBUG")
    with gateway_process(["materialize", "--commands-topic", unique_topic("commands"), "--ranges-topic",
                          unique_topic("ranges")], log, env=env):
        wait_until(lambda: log.read_text().count("retrying in") >= 2, timeout=30, what="two retry lines")
    text = log.read_text()
    assert f"SASL {mechanism}" in text and "'alice'" in text
    assert PASSWORD not in text


async def test_aiokafka_debug_lines_are_redacted(ca_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The filter clients.py puts on aiokafka's loggers, seen on the record a handler gets."""
    clients.security_settings(sasl_ssl(ca_file))
    with caplog.at_level(logging.DEBUG, logger="aiokafka.conn"):
        logging.getLogger("aiokafka.conn").debug("Request %s", b"\x00alice\x00" + PASSWORD.encode())
    assert caplog.records and PASSWORD not in caplog.text and "***" in caplog.text


async def test_serve_says_why_it_retries_and_recovers_when_the_broker_comes(tmp_path: Path, unique_topic) -> None:
    """No broker yet: /admin/status names it and gateway_kafka_connection_failing is 1, while serve
    retries; once a broker listens there, the problem clears and the gateway gets ready."""
    import aiohttp
    from helpers import eventually, free_port
    from liveserve import answers, samples

    kafka_port, admin_port = free_port(), free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    args = ["serve", "--kafka", f"127.0.0.1:{kafka_port}", "--commands-topic", unique_topic("commands"),
            "--ranges-topic", unique_topic("ranges"), "--listen", f"127.0.0.1:{free_port()}", "--admin-listen",
            f"127.0.0.1:{admin_port}", "--admin-token", "t", "--upstream", "http://127.0.0.1:9"]
    with gateway_process(args, tmp_path / "serve.log", env=clean_env()) as serve:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as session:
            async def status() -> dict:
                async with session.get(f"{admin}/admin/status") as response:
                    return await response.json()

            async def failing() -> float | None:
                async with session.get(f"{admin}/metrics") as response:
                    return samples(await response.text()).get(("gateway_kafka_connection_failing", ()))

            await answers(session, f"{admin}/readyz", status=503, process=serve)
            body = await eventually(status, until=lambda s: s["kafka_problem"], timeout=30, interval=0.2,
                                    what="kafka_problem in /admin/status")
            assert body["kafka_problem"] == (f"cannot connect to Kafka at 127.0.0.1:{kafka_port}: is the broker"
                                             " running and --kafka (GATEWAY_KAFKA) right?")
            await eventually(failing, until=lambda v: v == 1, timeout=30, interval=0.2, what="the gauge at 1")
            broker = start_broker(kafka_port)
            try:
                await answers(session, f"{admin}/readyz", process=serve)
                await eventually(status, until=lambda s: s["kafka_problem"] is None, timeout=30, interval=0.2,
                                 what="kafka_problem cleared")
                await eventually(failing, until=lambda v: v == 0, timeout=30, interval=0.2, what="the gauge at 0")
            finally:
                broker.stop()
