"""The `gateway` command line as an operator meets it: each bad input and each kind of broker
trouble gives one exact line and a non-zero exit, never a traceback; real processes, real brokers
(one frozen with SIGSTOP), loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from importlib.metadata import version
from pathlib import Path

import click
import pytest
from helpers import free_port, wait_until

from gateway.broker import start_broker, stop_pid

DATA = Path(__file__).parent / "data"


def clean_env(**extra: str) -> dict[str, str]:
    """The runner's environment without its GATEWAY_* variables, plus extra."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}, **extra}


def gateway(*args: str, stdin: str | bytes | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `gateway ARGS`; stdin as text, or as bytes passed on as they are (CRLF, BOM)."""
    run = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, timeout=timeout,
                         input=stdin.encode() if isinstance(stdin, str) else stdin, env=env or clean_env())
    return subprocess.CompletedProcess(run.args, run.returncode, run.stdout.decode(), run.stderr.decode())


def one_line_error(run: subprocess.CompletedProcess) -> str:
    """The run's whole output, which must be one line on stderr."""
    assert run.stdout == "" and run.stderr.count("\n") == 1, run.stdout + run.stderr
    return run.stderr.rstrip("\n")


# ---------------------------------------------------------------- bad input: exit 2


@pytest.mark.parametrize("args, message", [
    (["ctl", "--kafka", "host:abc", "blacklist", "10.0.0.0/8"],
     "Error: Invalid value for '--kafka' (env var: 'GATEWAY_KAFKA'): expected HOST:PORT[,HOST:PORT...],"
     " got 'host:abc' (see 'gateway ctl --help')"),
    (["serve", "--kafka", "host:abc", "--upstream", "http://127.0.0.1:9"],
     "Error: Invalid value for '--kafka' (env var: 'GATEWAY_KAFKA'): expected HOST:PORT[,HOST:PORT...],"
     " got 'host:abc' (see 'gateway serve --help')"),
    (["materialize", "--kafka", "a:1,host:"],
     "Error: Invalid value for '--kafka' (env var: 'GATEWAY_KAFKA'): expected HOST:PORT[,HOST:PORT...],"
     " got 'a:1,host:' (see 'gateway materialize --help')"),
    (["ctl", "blacklist", "10.0.0.0/8"],
     "Error: Missing option '--kafka' (env var: 'GATEWAY_KAFKA'). (see 'gateway ctl --help')"),
    (["materialize"], "Error: Missing option '--kafka' (env var: 'GATEWAY_KAFKA'). (see 'gateway materialize --help')"),
    (["ctl", "--kafka", "127.0.0.1:1", "blacklist", "10.0.0.1/8"],
     "Error: Invalid value for CIDR: '10.0.0.1/8': host bits set (did you mean 10.0.0.0/8?)"
     " (see 'gateway ctl blacklist --help')"),
    (["ctl", "--kafka", "127.0.0.1:1", "replay", "--until", "2024-05-01T12:00:00Z", "--offset", "3"],
     "Error: give either --until TIME or --offset N (one of them, not both) (see 'gateway ctl replay --help')"),
    (["ctl", "--kafka", "127.0.0.1:1", "replay"],
     "Error: give either --until TIME or --offset N (one of them, not both) (see 'gateway ctl replay --help')"),
    (["ctl", "--kafka", "127.0.0.1:1", "replay", "--until", "yesterday"],
     "Error: Invalid value for '--until' (env var: 'GATEWAY_CTL_REPLAY_UNTIL'): expected an ISO 8601 time such as"
     " 2024-05-01T12:00:00.5Z, got 'yesterday' (see 'gateway ctl replay --help')"),
    (["ctl", "--kafka", "127.0.0.1:1", "import", "no/such/file"],
     "Error: Invalid value for 'FILE': 'no/such/file': No such file or directory (see 'gateway ctl import --help')"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    run = gateway(*args)
    assert (run.returncode, one_line_error(run)) == (2, message)


@pytest.mark.parametrize("command, flag", [("broker", "--port"), ("bidder", "--listen")])
def test_a_busy_port_is_one_line_and_exit_1(command: str, flag: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port()))
        holder.listen()
        port = holder.getsockname()[1]
        run = gateway(command, flag, str(port) if flag == "--port" else f"127.0.0.1:{port}")
    hint = "--port (0: a free one)" if command == "broker" else "--listen"
    assert (run.returncode, one_line_error(run)) == (
        1, f"Error: port {port} is already in use on 127.0.0.1: stop what holds it, or pick another with {hint}")


def test_help_of_a_subcommand_needs_no_kafka_and_version_is_there() -> None:
    run = gateway("ctl", "blacklist", "--help")
    assert run.returncode == 0 and run.stdout.startswith("Usage: gateway ctl blacklist [OPTIONS] CIDR"), run.stderr
    run = gateway("--version")
    assert (run.returncode, run.stdout) == (0, f"gateway, version {version('gateway')}\n")


# ---------------------------------------------------------------- broker trouble: exit 1


def test_an_unreachable_broker_is_one_line_and_exit_1() -> None:
    for args, known in [(["blacklist", "10.0.0.0/8"], " Nothing was published."),
                        (["replay", "--offset", "0"], ""),
                        (["import", "-"], " Nothing was published.")]:
        run = gateway("ctl", "--kafka", "127.0.0.1:1", *args, stdin="10.0.0.0/8\n")
        assert (run.returncode, one_line_error(run)) == (1, "Error: cannot connect to Kafka at 127.0.0.1:1: is the"
                                                            f" broker running and --kafka (GATEWAY_KAFKA) right?{known}")


@pytest.fixture
def frozen_broker():
    """A broker of its own, frozen with SIGSTOP (what a hung or paused broker looks like)."""
    broker = start_broker(0)
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()  # SIGCONT first


def test_a_frozen_broker_is_one_line_and_exit_1_after_the_timeout(frozen_broker: str) -> None:
    said = f"Error: Kafka at {frozen_broker} did not answer within 1 s (--timeout): is the broker frozen or overloaded?"
    for args, known in [(["blacklist", "10.0.0.0/8"], " Nothing was published."),
                        (["replay", "--offset", "0"], ""),
                        (["import", "-"], " Nothing was published.")]:
        run = gateway("ctl", "--kafka", frozen_broker, *args, "--timeout", "1", stdin="10.0.0.0/8\n")
        assert (run.returncode, one_line_error(run)) == (1, said + known)


def test_topic_creation_off_and_no_topic_is_one_line(kafka_bootstrap: str, unique_topic) -> None:
    commands = unique_topic("commands")
    run = gateway("ctl", "--kafka", kafka_bootstrap, "--commands-topic", commands, "--ranges-topic",
                  unique_topic("ranges"), "--no-create-topics", "blacklist", "10.0.0.0/8")
    assert (run.returncode, one_line_error(run)) == (1, (
        f"Error: topic '{commands}' does not exist and topic creation is off (--no-create-topics): create it with"
        " the topics job (deploy/k8s/topics-job.yaml). Nothing was published."))
    run = gateway("ctl", "--kafka", kafka_bootstrap, "--commands-topic", commands, "replay", "--offset", "0")
    assert (run.returncode, one_line_error(run)) == (1, f"Error: topic '{commands}' does not exist")  # nothing created it


class Process:
    """A long-running CLI process whose stderr lines are collected as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "gateway", *args], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env=env or clean_env())
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=lambda: [self.lines.put(ln) for ln in self.process.stderr], daemon=True)
        self.reader.start()

    def said(self, pattern: str) -> list[str]:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return [line for line in self.seen if re.search(pattern, line)]

    def stop(self) -> int | None:
        code = stop_pid(self.process, timeout=20)
        self.reader.join(10)
        self.said("")
        return code


@pytest.mark.parametrize("json_logs", [False, True])
def test_materialize_without_a_broker_retries_one_line_per_attempt(json_logs: bool) -> None:
    materializer = Process("materialize", "--kafka", "127.0.0.1:1", *(["--json-logs"] if json_logs else []))
    try:
        wait_until(lambda: len(materializer.said("retrying in")) >= 2, timeout=30, what="two retry lines")
    finally:
        assert materializer.stop() == 0  # SIGTERM while it waits: a clean stop
    assert materializer.seen, "no output"
    for line, delay in zip(materializer.seen, ["1", "2", "4", "8"]):
        text = json.loads(line)["message"] if json_logs else line.rstrip("\n")
        assert text.endswith(f"cannot connect to Kafka at 127.0.0.1:1: is the broker running and --kafka"
                             f" (GATEWAY_KAFKA) right? (retrying in {delay} s)"), line


def test_materialize_json_logs_are_json_and_aiokafka_says_no_info(kafka_bootstrap: str, unique_topic) -> None:
    materializer = Process("materialize", "--kafka", kafka_bootstrap, "--commands-topic", unique_topic("commands"),
                           "--ranges-topic", unique_topic("ranges"), "--json-logs")
    try:
        wait_until(lambda: materializer.said("materializer active"), timeout=60, what="the materializer active")
    finally:
        assert materializer.stop() == 0
    entries = [json.loads(line) for line in materializer.seen]  # every line is one JSON object
    assert [e for e in entries if e["logger"].startswith("aiokafka") and e["level"] == "info"] == []


# ---------------------------------------------------------------- environment variables


def every_envvar(group: click.Group, path: str = "gateway") -> dict[str, set[str]]:
    """Environment variable -> the commands whose flags read it."""
    found: dict[str, set[str]] = {}
    for name, command in group.commands.items():
        where = f"{path} {name}"
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar:
                found.setdefault(param.envvar, set()).add(where)
        if isinstance(command, click.Group):
            for var, commands in every_envvar(command, where).items():
                found.setdefault(var, set()).update(commands)
    return found


def test_no_environment_variable_reaches_two_commands_unless_it_is_global() -> None:
    from gateway.cli import GLOBAL, cli, env_name

    global_vars = {env_name("GATEWAY", flag) for flag in GLOBAL}
    shared = {var: cmds for var, cmds in every_envvar(cli).items() if len(cmds) > 1 and var not in global_vars}
    assert shared == {}
    names = every_envvar(cli)
    assert {"GATEWAY_SERVE_LISTEN", "GATEWAY_BIDDER_LISTEN", "GATEWAY_BROKER_PORT", "GATEWAY_DEMO_PORT",
            "GATEWAY_KAFKA", "GATEWAY_ADMIN_TOKEN"} <= set(names)
    assert not [var for var in names if var.endswith("_WHITELIST")]  # import --whitelist is a flag only


def test_a_stray_whitelist_variable_never_turns_an_import_into_whitelists(kafka_bootstrap, unique_topic) -> None:
    commands = unique_topic("commands")
    env = clean_env(GATEWAY_WHITELIST="1", GATEWAY_CTL_IMPORT_WHITELIST="1", GATEWAY_KAFKA=kafka_bootstrap)
    run = gateway("ctl", "--commands-topic", commands, "import", "-", stdin="192.0.2.0/24\n", env=env)
    assert run.returncode == 0, run.stderr
    run = gateway("ctl", "--kafka", kafka_bootstrap, "--commands-topic", commands, "replay", "--offset", "0")
    assert run.stdout == "192.0.2.0 192.0.2.255\n"  # blacklisted, not whitelisted


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_bidder_reads_its_own_listen_variable_not_serves() -> None:
    mine, serves = free_port(), free_port()
    bidder = Process("bidder", env=clean_env(GATEWAY_BIDDER_LISTEN=f"127.0.0.1:{mine}",
                                             GATEWAY_SERVE_LISTEN=f"127.0.0.1:{serves}",
                                             GATEWAY_LISTEN=f"127.0.0.1:{serves}"))
    try:
        wait_until(lambda: listening(mine), timeout=30, what="the bidder on GATEWAY_BIDDER_LISTEN")
        assert not listening(serves)
    finally:
        assert bidder.stop() == 0


# ---------------------------------------------------------------- replay and import


def published(kafka_bootstrap: str, commands: str, offset: int) -> subprocess.CompletedProcess:
    return gateway("ctl", "--kafka", kafka_bootstrap, "--commands-topic", commands, "replay", "--offset", str(offset))


def test_replay_offset_is_inclusive_like_history_and_past_the_end_warns(kafka_bootstrap, unique_topic) -> None:
    commands = unique_topic("commands")
    ctl = ["ctl", "--kafka", kafka_bootstrap, "--commands-topic", commands]
    assert gateway(*ctl, "blacklist", "10.1.0.0/16").stdout == "BLACKLIST 10.1.0.0/16 -> offset 0\n"
    assert gateway(*ctl, "blacklist", "10.3.0.0/16").returncode == 0

    run = published(kafka_bootstrap, commands, 0)
    assert run.stdout == "10.1.0.0 10.1.255.255\n"  # the state right after command 0: it is included
    assert run.stderr == "# 1 ranges from 1 commands (next offset 1, 0 skipped)\n"
    run = published(kafka_bootstrap, commands, 9)
    assert run.stdout == "10.1.0.0 10.1.255.255\n10.3.0.0 10.3.255.255\n"
    assert run.stderr.splitlines()[0] == ("warning: offset 9 is past the end of the command log (its last offset is 1):"
                                          " this is the state after every command")
    run = gateway(*ctl, "replay", "--until", "2000-01-01T00:00:00.250Z")  # fractional seconds, as /admin/history
    assert (run.returncode, run.stdout) == (0, "")


FEEDS = {
    "spamhaus-drop.txt": ["192.0.2.0/24", "198.51.100.0/25", "203.0.113.64/26"],
    "spamhaus-edrop.txt": ["100.64.0.0/24", "100.64.8.0/21"],
    "spamhaus-dropv6.txt": ["2001:db8:1::/48", "2001:db8:ff00::/40"],
    "firehol-level1.netset": ["0.0.0.0/8", "192.0.2.1/32", "198.18.0.0/15", "203.0.113.0/24"],
    "plain-list.txt": ["192.0.2.7/32", "198.51.100.128/25", "2001:db8::1/128", "2001:db8:abcd::/48"],
    "plain-list-bom.txt": ["192.0.2.200/32", "203.0.113.0/24"],
}


@pytest.mark.parametrize("feed", sorted(FEEDS))
@pytest.mark.parametrize("from_stdin", [False, True])
def test_real_feed_formats_import_as_published(feed: str, from_stdin: bool, kafka_bootstrap, unique_topic,
                                               read_topic) -> None:
    commands = unique_topic("commands")
    ctl = ["ctl", "--kafka", kafka_bootstrap, "--commands-topic", commands, "import"]
    run = gateway(*ctl, "-", stdin=(DATA / feed).read_bytes()) if from_stdin else gateway(*ctl, str(DATA / feed))
    expected = FEEDS[feed]
    assert (run.returncode, run.stdout) == (0, f"published {len(expected)} commands at offsets 0..{len(expected) - 1}\n"), \
        run.stderr
    records = asyncio.run(read_topic(commands))
    assert [r.value.decode() for r in records] == [f"BLACKLIST {cidr}" for cidr in expected]


def test_an_import_with_a_bad_line_publishes_nothing(kafka_bootstrap, unique_topic) -> None:
    commands = unique_topic("commands")
    run = gateway("ctl", "--kafka", kafka_bootstrap, "--commands-topic", commands, "import", "-",
                  stdin="192.0.2.0/24 ; fine\n10.0.0.1/8 ; host bits\n")
    assert run.returncode == 1
    assert run.stderr.splitlines() == ["Error: <stdin>: 1 invalid line(s), nothing sent:",
                                       "  line 2: '10.0.0.1/8': host bits set (did you mean 10.0.0.0/8?) (nothing was published)"]
    run = published(kafka_bootstrap, commands, 0)
    assert (run.returncode, one_line_error(run)) == (1, f"Error: topic '{commands}' does not exist")  # nothing sent
