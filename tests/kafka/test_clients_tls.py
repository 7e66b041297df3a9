"""Kafka over real TLS (issue 17): every client path of the product through HAProxy terminating
mutual TLS in front of Tansu, which advertises HAProxy's address (tlsrig.py); and the refusals
(untrusted certificate, no client certificate, hostname mismatch, plaintext to a TLS port) are
one line that names the cause, in `ctl`, in `materialize`'s log and in `serve`'s status.

The backend port of Tansu is never given to a client: a client that did not speak TLS to the
proxy could not reach the broker at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from helpers import eventually, free_port
from liveserve import answers, gateway_process, samples
from tlsrig import TlsKafka, tls_kafka

TOKEN = "tls-test-token"
FAILING = ("gateway_kafka_connection_failing", ())


def need_haproxy() -> None:
    if not shutil.which("haproxy") and not Path("/usr/sbin/haproxy").exists():
        pytest.skip("haproxy not installed (Debian package haproxy; `python3 dev.py` as root installs it)")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsKafka]:
    need_haproxy()
    with tls_kafka(tmp_path_factory.mktemp("tls")) as rig:
        yield rig


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any GATEWAY_* setting of the caller's shell."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}, **extra}


def gateway(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env(), stdin=subprocess.DEVNULL)


def topics(topic_names) -> list[str]:
    return ["--commands-topic", topic_names.commands, "--ranges-topic", topic_names.ranges]


async def test_every_client_path_runs_over_mutual_tls(tls: TlsKafka, topic_names, tmp_path: Path) -> None:
    """materialize (flags), serve with its follower, admin publisher, history, command log and
    snapshot (settings from GATEWAY_* variables), ctl blacklist, replay and verify: all through the proxy."""
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    env = clean_env(**tls.env(), GATEWAY_COMMANDS_TOPIC=topic_names.commands, GATEWAY_RANGES_TOPIC=topic_names.ranges)
    materializer_port = free_port()
    with contextlib.ExitStack() as processes:
        processes.enter_context(gateway_process(["materialize", *tls.args(), *topics(topic_names), "--admin-listen",
                                                 f"127.0.0.1:{materializer_port}"], tmp_path / "materialize.log"))
        serve = processes.enter_context(gateway_process(
            ["serve", "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{admin_port}",
             "--admin-token", TOKEN, "--upstream", "http://127.0.0.1:9", "--snapshot", str(tmp_path / "view.snap")],
            tmp_path / "serve.log", env=env))
        async with aiohttp.ClientSession(headers=auth) as session:
            await answers(session, f"{admin}/readyz", process=serve)

            cli = gateway("ctl", *tls.args(), *topics(topic_names), "blacklist", "10.0.0.0/24", "--reason", "tls")
            assert (cli.returncode, cli.stderr) == (0, ""), cli.stderr
            assert cli.stdout.strip() == "BLACKLIST 10.0.0.0/24 -> offset 0"

            async with session.post(f"{admin}/admin/commands?wait=1", json={"command": "BLACKLIST 192.0.2.0/24"},
                                    timeout=aiohttp.ClientTimeout(total=60)) as response:
                assert response.status == 202, await response.text()
                published = await response.json()
                assert published["offset"] == 1

            async def lookup(ip: str) -> bool:
                async with session.get(f"{admin}/admin/lookup", params={"ip": ip}) as response:
                    return (await response.json())["blocked"]

            await eventually(lambda: lookup("10.0.0.5"), timeout=60, interval=0.1, what="10.0.0.5 blocked over TLS")
            assert await lookup("192.0.2.7")

            async with session.get(f"{admin}/admin/history", params={"at": "0", "format": "cidr"}) as response:
                assert response.status == 200 and (await response.text()).split() == ["10.0.0.0/24"]
            async with session.get(f"{admin}/admin/commands", params={"request_id": published["request_id"]}) as response:
                assert response.status == 200, await response.text()  # the command log, read over TLS
                assert [c["command"] for c in (await response.json())["commands"]] == ["BLACKLIST 192.0.2.0/24"]
            async with session.get(f"{admin}/admin/status") as response:
                assert (await response.json())["kafka_problem"] is None
            for url in (f"{admin}/metrics", f"http://127.0.0.1:{materializer_port}/metrics"):
                async with session.get(url) as response:
                    assert samples(await response.text())[FAILING] == 0, url

        replay = gateway("ctl", *tls.args(), *topics(topic_names), "replay", "--offset", "1")
        assert replay.returncode == 0, replay.stderr
        assert replay.stdout.split("\n")[:2] == ["10.0.0.0 10.0.0.255", "192.0.2.0 192.0.2.255"]
        verify = await eventually(
            lambda: gateway("ctl", *tls.args(), *topics(topic_names), "verify", "--gateway", admin, "--token", TOKEN),
            until=lambda run: run.returncode == 0, timeout=60, interval=0.5, what="ctl verify over TLS to say equal")
        assert verify.stdout.rstrip().endswith("OK: equal")


def one_line(run: subprocess.CompletedProcess) -> str:
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_an_untrusted_certificate_is_one_line_naming_it(tls: TlsKafka, topic_names) -> None:
    run = gateway("ctl", *tls.args(ca=tls.other_ca), *topics(topic_names), "blacklist", "10.0.0.0/8")
    assert run.returncode == 1
    assert one_line(run) == (f"Error: Kafka at {tls.bootstrap}: the broker's TLS certificate is not trusted (unable to"
                             f" get local issuer certificate): check --kafka-ssl-cafile ({tls.other_ca}). Nothing was"
                             " published.")


def test_the_system_trust_store_does_not_trust_a_private_ca(tls: TlsKafka, topic_names) -> None:
    """No --kafka-ssl-cafile: the system's CAs, which never signed the test CA's certificates."""
    run = gateway("ctl", "--kafka", tls.bootstrap, "--kafka-security-protocol", "SSL", *topics(topic_names),
                  "replay", "--offset", "0")
    assert run.returncode == 1
    assert "the broker's TLS certificate is not trusted" in one_line(run) and "system trust store" in run.stderr


def test_a_listener_that_wants_a_client_certificate_is_named(tls: TlsKafka, topic_names) -> None:
    run = gateway("ctl", *tls.args(client_cert=False), *topics(topic_names), "blacklist", "10.0.0.0/8")
    assert run.returncode == 1
    assert one_line(run) == (f"Error: Kafka at {tls.bootstrap} closed the TLS connection: it wants a client certificate"
                             " (--kafka-ssl-certfile and --kafka-ssl-keyfile). Nothing was published.")


def test_plaintext_to_a_tls_listener_is_named(tls: TlsKafka, topic_names) -> None:
    run = gateway("ctl", "--kafka", tls.bootstrap, *topics(topic_names), "blacklist", "10.0.0.0/8")
    assert run.returncode == 1
    assert one_line(run) == (f"Error: Kafka at {tls.bootstrap} closed the connection before answering: is it a TLS"
                             " listener (--kafka-security-protocol SSL or SASL_SSL)? Nothing was published.")


def test_hostname_verification_is_on_unless_turned_off(tls: TlsKafka, topic_names) -> None:
    """The `by_name` frontend's certificate names only localhost: reached as 127.0.0.1 it is refused,
    unless --kafka-ssl-no-check-hostname (the CA is still checked)."""
    by_ip = ["--kafka", f"127.0.0.1:{tls.by_name_port}", *tls.args()[2:]]
    refused = gateway("ctl", *by_ip, *topics(topic_names), "blacklist", "10.0.0.0/8")
    assert refused.returncode == 1
    assert one_line(refused).startswith(f"Error: Kafka at 127.0.0.1:{tls.by_name_port}: the broker's TLS certificate"
                                        " does not name 127.0.0.1 (")
    allowed = gateway("ctl", *by_ip, "--kafka-ssl-no-check-hostname", *topics(topic_names), "blacklist", "10.0.0.0/8")
    assert (allowed.returncode, allowed.stdout.strip()) == (0, "BLACKLIST 10.0.0.0/8 -> offset 0"), allowed.stderr
    still_checked = gateway("ctl", "--kafka", f"127.0.0.1:{tls.by_name_port}", *tls.args(ca=tls.other_ca)[2:],
                            "--kafka-ssl-no-check-hostname", *topics(topic_names), "blacklist", "10.0.0.0/8")
    assert still_checked.returncode == 1 and "is not trusted" in one_line(still_checked)


async def test_serve_with_an_untrusted_certificate_retries_and_says_why(tls: TlsKafka, topic_names, tmp_path) -> None:
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    with gateway_process(["serve", *tls.args(ca=tls.other_ca), *topics(topic_names), "--listen",
                          f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{admin_port}", "--admin-token",
                          TOKEN, "--upstream", "http://127.0.0.1:9"], tmp_path / "serve.log", env=clean_env()) as serve:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            await answers(session, f"{admin}/readyz", status=503, process=serve)

            async def status() -> dict:
                async with session.get(f"{admin}/admin/status") as response:
                    return await response.json()

            async def metrics() -> dict:
                async with session.get(f"{admin}/metrics") as response:
                    return samples(await response.text())

            body = await eventually(status, until=lambda s: s["kafka_problem"], timeout=60, interval=0.2,
                                    what="/admin/status to name the broker problem")
            assert body["kafka_problem"].startswith(f"Kafka at {tls.bootstrap}: the broker's TLS certificate is not"
                                                    " trusted")
            assert body["ready"] is False
            await eventually(metrics, until=lambda m: m.get(FAILING) == 1, timeout=30, interval=0.2,
                             what="gateway_kafka_connection_failing 1")
            await eventually(lambda: (tmp_path / "serve.log").read_text().count("is not trusted") >= 2, timeout=30,
                             interval=0.2, what="two retries logged")
        assert serve.poll() is None  # it keeps retrying


async def test_materialize_with_an_untrusted_certificate_logs_the_cause_each_retry(tls: TlsKafka, topic_names,
                                                                                    tmp_path) -> None:
    log, port = tmp_path / "materialize.log", free_port()
    with gateway_process(["materialize", *tls.args(ca=tls.other_ca), *topics(topic_names), "--admin-listen",
                          f"127.0.0.1:{port}"], log, env=clean_env()):
        async with aiohttp.ClientSession() as session:
            async def metrics() -> dict:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    return samples(await response.text())

            await eventually(metrics, until=lambda m: m.get(FAILING) == 1, timeout=30, interval=0.2,
                             what="the materializer's gateway_kafka_connection_failing 1")
            lines = await eventually_lines(log, "retrying in")
    assert lines[0].endswith(f"Kafka at {tls.bootstrap}: the broker's TLS certificate is not trusted (unable to get"
                             f" local issuer certificate): check --kafka-ssl-cafile ({tls.other_ca}) (retrying in 1 s)")
    assert lines[1].endswith("(retrying in 2 s)")


async def eventually_lines(log: Path, text: str, count: int = 2) -> list[str]:
    await eventually(lambda: log.read_text().count(text) >= count, timeout=30, what=f"{count} lines with {text!r}")
    return [line for line in log.read_text().splitlines() if text in line]


def test_sasl_ssl_gets_through_tls_to_a_refused_login_named_in_one_line(tmp_path: Path, topic_names) -> None:
    """SASL_SSL end to end as far as Tansu allows: mutual TLS through the proxy, then a real SCRAM
    exchange with a broker that requires it (`--authentication`) and knows no user; the password
    appears in no output."""
    need_haproxy()
    password = "pw-sasl-ssl-5d41402a-never-print"
    with tls_kafka(tmp_path, broker_args=("--authentication",)) as rig:
        run = gateway("ctl", *rig.args(), "--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-mechanism",
                      "SCRAM-SHA-512", "--kafka-sasl-username", "alice", *topics(topic_names), "blacklist", "10.0.0.0/8",
                      env=clean_env(GATEWAY_KAFKA_SASL_PASSWORD=password))
    assert run.returncode == 1
    assert one_line(run) == (f"Error: Kafka at {rig.bootstrap}: SASL SCRAM-SHA-512 authentication failed for user"
                             " 'alice': wrong username or password? Nothing was published.")
    assert password not in run.stdout + run.stderr
