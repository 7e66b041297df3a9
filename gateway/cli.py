"""The `gateway` command line.

Environment variables: every flag of a command reads GATEWAY_<COMMAND>_<FLAG>
(GATEWAY_SERVE_LISTEN, GATEWAY_BIDDER_LISTEN, GATEWAY_CTL_IMPORT_ACTOR; see name_envvars),
so one variable never reaches two commands that mean different things by it. The settings
that mean the same everywhere keep one global name (GLOBAL below: GATEWAY_KAFKA,
GATEWAY_ADMIN_TOKEN, ...). Flags that change what a command does to the log
(`import --whitelist`) read no variable at all.

Errors are one line on stderr and a non-zero exit: 2 for bad input, 1 for trouble with
the broker (after a bounded time), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import click

from .blacklist.guard import (
    DEFAULT_MAX_BLOCK_SHARE,
    DEFAULT_MAX_PREFIX,
    DEFAULT_MAX_UNBLOCK_SHARE,
)
from .http.config import ServeConfig
from .http.engines import DEFAULT as DEFAULT_ENGINE
from .http.engines import ENGINES
from .kafka.config import (
    DEFAULT_COMMANDS_TOPIC,
    DEFAULT_RANGES_TOPIC,
    KafkaConfig,
    parse_hostport,
)

ENV_PREFIX = "GATEWAY"
# Flags with one meaning in every command: one global variable each (documented in README).
GLOBAL = {"--kafka", "--commands-topic", "--ranges-topic", "--create-topics", "--replication-factor",
          "--kafka-security-protocol", "--kafka-sasl-mechanism", "--kafka-sasl-username",
          "--kafka-sasl-password-file", "--kafka-ssl-cafile", "--kafka-ssl-certfile", "--kafka-ssl-keyfile",
          "--kafka-ssl-check-hostname", "--admin-token", "--json-logs"}
# The SASL password is read from this variable (or --kafka-sasl-password-file), never from a flag:
# a flag would put it in `ps`, shell history and unit files.
PASSWORD_ENV = "GATEWAY_KAFKA_SASL_PASSWORD"
KAFKA_TIMEOUT_S = 10.0  # how long a one-shot command (ctl) waits for the broker


def option(*names: str, **kwargs: Any) -> Callable:
    """A click option: GATEWAY_<FLAG> when GLOBAL, else GATEWAY_<COMMAND>_<FLAG> (name_envvars)."""
    long_name = next(n for n in names if n.startswith("--")).split("/")[0]
    if long_name in GLOBAL:
        kwargs["envvar"] = env_name(ENV_PREFIX, long_name)
    return click.option(*names, show_envvar=True, **kwargs)


def env_name(prefix: str, word: str) -> str:
    return f"{prefix}_{word.lstrip('-').upper().replace('-', '_')}"


def name_envvars(group: click.Group, prefix: str = ENV_PREFIX) -> None:
    """Give each command's own flags GATEWAY_<COMMAND>_<FLAG>, named after the long flag (click's
    auto_envvar_prefix would use the Python parameter name: GATEWAY_SERVE_UPSTREAMS). Flags
    declared with allow_from_autoenv=False read no variable."""
    for name, command in group.commands.items():
        path = env_name(prefix, name)
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar is None and param.allow_from_autoenv and param.expose_value:
                param.envvar = env_name(path, next(o for o in param.opts if o.startswith("--")))
        if isinstance(command, click.Group):
            name_envvars(command, path)


def kafka_options(command: Callable) -> Callable:
    """The options every Kafka client shares, gathered into one KafkaConfig argument (None
    when --kafka is not given: subcommands that need it say so, and --help works without it)."""

    @option("--kafka", metavar="HOST:PORT[,HOST:PORT]", callback=bootstrap_servers,
            help="Kafka bootstrap servers (required).")
    @option("--commands-topic", default=DEFAULT_COMMANDS_TOPIC, show_default=True)
    @option("--ranges-topic", default=DEFAULT_RANGES_TOPIC, show_default=True)
    @option("--create-topics/--no-create-topics", default=True, show_default=True,
            help="Create missing topics. Production: off, the topics job creates them with their replication.")
    @option("--replication-factor", default=1, show_default=True, type=click.IntRange(min=1),
            help="Replication factor of topics this process creates (3 on a production cluster).")
    @kafka_security_options
    @functools.wraps(command)
    def wrapper(kafka: str | None, commands_topic: str, ranges_topic: str, create_topics: bool,
                replication_factor: int, **kwargs: Any) -> Any:
        security = {name: kwargs.pop(name) for name in SECURITY_PARAMS}
        config = None if kafka is None else kafka_config(
            kafka, commands_topic=commands_topic, ranges_topic=ranges_topic, create_topics=create_topics,
            replication_factor=replication_factor, **security)
        return command(config, **kwargs)

    return wrapper


SECURITY_PARAMS = ("kafka_security_protocol", "kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password_file",
                   "kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile", "kafka_ssl_check_hostname")


def kafka_security_options(command: Callable) -> Callable:
    """How every Kafka client of the command reaches the brokers: TLS, mutual TLS, SASL."""
    from .kafka.config import SASL_MECHANISMS, SECURITY_PROTOCOLS

    # Checked when the command runs (kafka_config), not when the line is parsed: the files are
    # secrets mounted where the process runs, not where its command line is checked.
    readable = click.Path(dir_okay=False)
    for decorator in reversed([
        option("--kafka-security-protocol", type=click.Choice(SECURITY_PROTOCOLS),
               default="PLAINTEXT", show_default=True,
               help="SASL_SSL for Amazon MSK, Confluent Cloud, Aiven; SSL for TLS or mutual TLS alone."),
        option("--kafka-sasl-mechanism", type=click.Choice(SASL_MECHANISMS), default=None,
               help="With SASL_SSL or SASL_PLAINTEXT."),
        option("--kafka-sasl-username", default=None, metavar="NAME", help="The SASL user (principal User:NAME)."),
        option("--kafka-sasl-password-file", type=readable, default=None, metavar="PATH",
               help=f"File holding the SASL password (trailing newline ignored). Or set {PASSWORD_ENV};"
                    " there is no flag for the password itself."),
        option("--kafka-ssl-cafile", type=readable, default=None, metavar="PATH",
               help="CA bundle (PEM) that signed the brokers' certificates (default: the system's trust store)."),
        option("--kafka-ssl-certfile", type=readable, default=None, metavar="PATH",
               help="Client certificate (PEM) for mutual TLS."),
        option("--kafka-ssl-keyfile", type=readable, default=None, metavar="PATH",
               help="Private key (PEM) of --kafka-ssl-certfile."),
        option("--kafka-ssl-check-hostname/--kafka-ssl-no-check-hostname", default=True, show_default=True,
               help="Check that the broker's certificate names the host connected to. Turn off only for"
                    " brokers reached by an address their certificate does not carry."),
    ]):
        command = decorator(command)
    return command


def kafka_config(bootstrap: str, *, kafka_security_protocol: str = "PLAINTEXT", kafka_sasl_mechanism: str | None = None,
                 kafka_sasl_username: str | None = None, kafka_sasl_password_file: str | None = None,
                 kafka_ssl_cafile: str | None = None, kafka_ssl_certfile: str | None = None,
                 kafka_ssl_keyfile: str | None = None, kafka_ssl_check_hostname: bool = True,
                 **topics: Any) -> KafkaConfig:
    """The KafkaConfig of the flags; the password from its file or GATEWAY_KAFKA_SASL_PASSWORD.
    Settings that cannot work together are a usage error (exit 2) before anything connects."""
    from .kafka.config import KafkaSettingsError

    for flag, path in (("--kafka-sasl-password-file", kafka_sasl_password_file), ("--kafka-ssl-cafile", kafka_ssl_cafile),
                       ("--kafka-ssl-certfile", kafka_ssl_certfile), ("--kafka-ssl-keyfile", kafka_ssl_keyfile)):
        if path is not None and not os.access(path, os.R_OK):
            reason = "it does not exist" if not os.path.exists(path) else "it is not readable by this user"
            raise click.UsageError(f"Kafka settings: cannot read {flag} {path}: {reason}")
    password = os.environ.get(PASSWORD_ENV) or None
    if kafka_sasl_password_file is not None:
        if password is not None:
            raise click.UsageError(f"give the SASL password one way: {PASSWORD_ENV} or --kafka-sasl-password-file,"
                                   " not both")
        with open(kafka_sasl_password_file, encoding="utf-8") as file:
            password = file.read().rstrip("\r\n") or None
    try:
        return KafkaConfig(
            bootstrap, **topics, security_protocol=kafka_security_protocol,
            sasl_mechanism=kafka_sasl_mechanism,
            sasl_username=kafka_sasl_username, sasl_password=password, ssl_cafile=kafka_ssl_cafile,
            ssl_certfile=kafka_ssl_certfile, ssl_keyfile=kafka_ssl_keyfile, ssl_check_hostname=kafka_ssl_check_hostname)
    except KafkaSettingsError as exc:
        raise click.UsageError(f"Kafka settings: {exc}") from None


def need_kafka(kafka: KafkaConfig | None) -> KafkaConfig:
    """The KafkaConfig, or the usage error click would give for a missing required option."""
    if kafka is None:
        ctx = click.get_current_context()
        while ctx.parent is not None and not any(p.name == "kafka" for p in ctx.command.params):
            ctx = ctx.parent  # the --help that lists --kafka
        raise click.UsageError("Missing option '--kafka' (env var: 'GATEWAY_KAFKA').", ctx=ctx)
    return kafka


def bootstrap_servers(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`HOST:PORT[,HOST:PORT...]`, checked here so a typo is a usage error, not a traceback later."""
    if value is None:
        return None
    for server in value.split(","):
        try:
            parse_hostport(server.strip())
        except ValueError:
            raise click.BadParameter(f"expected HOST:PORT[,HOST:PORT...], got {value!r}") from None
    return value


def hostport(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    try:
        return parse_hostport(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


class KafkaTrouble(click.ClickException):
    """The broker could not be used: one line, exit 1."""


def run_kafka(kafka: KafkaConfig, coro_factory: Callable[[], Any], *, timeout: float | None,
              what: Callable[[], str] = lambda: "", message_timeout: float | None = None) -> Any:
    """Run a one-shot Kafka job in a bounded time; broker trouble becomes one line that says
    what to check and, from `what()`, what is known of the job's effect (published or not)."""
    from aiokafka.errors import KafkaConnectionError, KafkaError

    from .kafka.clients import KafkaAccessError
    from .kafka.topics import TopicError

    quiet_kafka_client()
    try:
        return run_async(asyncio.wait_for(coro_factory(), timeout))
    except (TimeoutError, asyncio.TimeoutError):
        problem = (f"Kafka at {kafka.bootstrap} did not answer within {message_timeout or timeout:g} s (--timeout): is the broker"
                   " frozen or overloaded?")
    except KafkaAccessError as exc:  # names the cause: unreachable, untrusted certificate, refused password
        problem = str(exc)
    except KafkaConnectionError:
        problem = f"cannot connect to Kafka at {kafka.bootstrap}: is the broker running and --kafka (GATEWAY_KAFKA) right?"
    except TopicError as exc:
        problem = str(exc)
    except (KafkaError, OSError) as exc:
        problem = f"Kafka at {kafka.bootstrap} failed: {exc}"
    known = what()
    raise KafkaTrouble(f"{problem.rstrip('.')}. {known}" if known and not problem.endswith("?") else
                       " ".join(filter(None, [problem, known])))


def quiet_kafka_client() -> None:
    """One-shot commands report broker trouble themselves, in one line: aiokafka's own
    connection errors would only repeat it, as tracebacks."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def timeout_option(command: Callable) -> Callable:
    return option("--timeout", default=KAFKA_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0.1),
                  metavar="SECONDS", help="Give up on an unresponsive broker after this long.")(command)


class IsoTime(click.ParamType):
    """An ISO 8601 time as /admin/history reads it (fractional seconds, Z or an offset; no zone = UTC)."""

    name = "ISO-TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            self.fail(f"expected an ISO 8601 time such as 2024-05-01T12:00:00.5Z, got {value!r}", param, ctx)
        return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def run_async(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


def tls_options(command: Callable) -> Callable:
    """HTTPS on the proxy port and on the admin listener (reloaded on SIGHUP)."""
    path = click.Path(dir_okay=False)
    for flag, help_text in reversed([
        ("--tls-cert", "Serve the proxy port over HTTPS with this certificate chain (PEM)."),
        ("--tls-key", "Private key (PEM) of --tls-cert."),
        ("--admin-tls-cert", "Serve the admin listener over HTTPS with this certificate chain (PEM);"
                             " give the same files as --tls-cert to reuse that pair."),
        ("--admin-tls-key", "Private key (PEM) of --admin-tls-cert."),
        ("--admin-tls-client-ca", "Require admin clients to present a certificate signed by this CA (PEM)."),
    ]):
        command = option(flag, default=None, type=path, metavar="PATH", help=help_text)(command)
    return command


def tls_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Pop the TLS flags from `settings`; the checked TlsFiles, or a one-line usage error (exit 2).

    Every file is loaded here once, so a bad pair refuses to start instead of serving without TLS."""
    from .http.tls import TlsError, TlsFiles, server_context

    cert, key = settings.pop("tls_cert"), settings.pop("tls_key")
    admin_cert, admin_key = settings.pop("admin_tls_cert"), settings.pop("admin_tls_key")
    client_ca = settings.pop("admin_tls_client_ca")
    if bool(cert) != bool(key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if bool(admin_cert) != bool(admin_key):
        raise click.UsageError("--admin-tls-cert and --admin-tls-key go together")
    if client_ca and not admin_cert:
        raise click.UsageError("--admin-tls-client-ca needs --admin-tls-cert and --admin-tls-key")
    if cert and settings.get("proxy_protocol"):
        raise click.UsageError("--proxy-protocol cannot be combined with --tls-cert: the PROXY header comes"
                               " before the TLS handshake (terminate TLS in the balancer, or pass it through"
                               " without PROXY protocol)")
    tls = TlsFiles(cert, key) if cert else None
    admin_tls = TlsFiles(admin_cert, admin_key, client_ca) if admin_cert else None
    for files in (tls, admin_tls):
        if files is not None:
            try:
                server_context(files)
            except TlsError as exc:
                raise click.UsageError(str(exc)) from None
    return {"tls": tls, "admin_tls": admin_tls}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="gateway", prog_name="gateway")
def cli() -> None:
    """Ad-exchange request gateway with an event-sourced IP blacklist."""


@cli.command()
@kafka_options
@option("--listen", default="0.0.0.0:8080", show_default=True, callback=hostport, help="Proxy listener.")
@option("--upstream", "upstreams", multiple=True, required=True, metavar="URL", help="Bidder URL (repeatable).")
@option("--admin-listen", default="127.0.0.1:8081", show_default=True, callback=hostport)
@option("--admin-token", "admin_tokens", multiple=True, metavar="[NAME=]TOKEN",
        help="Bearer token for /admin/* (required for admin routes). Repeatable: NAME=TOKEN records NAME as the"
             " actor of the commands published with that token; a bare TOKEN records admin-api.")
@option("--mode", type=click.Choice(["enforce", "shadow"]), default="enforce", show_default=True,
        help="shadow: forward requests the blacklist would refuse, counted as shadow_blocked (try a list safely).")
@option("--max-prefix", "max_prefix_v4", default=DEFAULT_MAX_PREFIX[4], show_default=True, type=click.IntRange(0, 32),
        help="POST /admin/commands refuses an IPv4 BLACKLIST wider than this prefix unless forced.")
@option("--max-prefix-v6", "max_prefix_v6", default=DEFAULT_MAX_PREFIX[6], show_default=True,
        type=click.IntRange(0, 128), help="The same for IPv6.")
@option("--budget-ms", default=100.0, show_default=True, type=click.FloatRange(min=1))
@option("--reject-status", default=403, show_default=True, type=click.IntRange(100, 599))
@option("--timeout-status", default=204, show_default=True, type=click.IntRange(100, 599))
@option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="CIDR", help="Peer whose X-Forwarded-For is trusted.")
@option("--openrtb", is_flag=True,
        help="Also check device.ip/device.ipv6 in JSON bodies; blocked and upstream errors answer 204 (no bid),"
             " whatever --reject-status and --upstream-error-status say.")
@option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
@option("--snapshot", default=None, metavar="PATH", help="Snapshot file of the view, for instant restarts.")
@option("--upstream-error-status", default=502, show_default=True, type=click.IntRange(100, 599),
        help="Answer when no upstream could be reached (204 in --openrtb mode).")
@option("--max-body-bytes", "max_body_bytes", default=1 << 20, show_default=True, type=click.IntRange(min=0))
@option("--max-header-bytes", default=8 << 10, show_default=True, type=click.IntRange(min=256))
@option("--max-in-flight", default=512, show_default=True, type=click.IntRange(min=1),
        help="Requests in flight per worker before new ones are shed with 503.")
@option("--idle-timeout-s", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
        help="Close keep-alive connections idle this long.")
@option("--request-timeout-s", default=5.0, show_default=True, type=click.FloatRange(min=0.01),
        help="A begun request must be fully received within this (else 408).")
@option("--proxy-protocol", is_flag=True,
        help="Connections from --trusted-proxy peers start with a PROXY protocol v1/v2 header (required from them).")
@option("--retry-non-idempotent", is_flag=True,
        help="Resend a POST whose reused upstream connection died before answering (it may run twice).")
@option("--engine", type=click.Choice(ENGINES), default=DEFAULT_ENGINE, show_default=True,
        help="Front door: fast (httptools protocol) or aiohttp (aiohttp's low-level server); same rules.")
@option("--access-log", is_flag=True, help="Log every request.")
@option("--json-logs", is_flag=True, help="Log JSON lines.")
@tls_options
def serve(kafka: KafkaConfig | None, upstreams: tuple[str, ...], trusted_proxies: tuple[str, ...],
          admin_tokens: tuple[str, ...], **settings: Any) -> None:
    """Run the gateway: follow the view, block blacklisted clients, forward the rest."""
    from .server import ListenError, run

    settings.update(tls_settings(settings))
    bare, named = split_admin_tokens(admin_tokens)
    try:
        run(ServeConfig(kafka=need_kafka(kafka), upstreams=upstreams, trusted_proxies=trusted_proxies,
                        admin_token=bare, admin_tokens=named, **settings))
    except ListenError as exc:  # one line, non-zero exit, before any worker exists
        raise click.ClickException(str(exc)) from None


def split_admin_tokens(given: tuple[str, ...]) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """`--admin-token` values: at most one bare TOKEN, and NAME=TOKEN pairs (NAME: letters, digits, . _ -).

    A value is NAME=TOKEN only when NAME is such a word and TOKEN is not empty and does not start
    with '=', so a base64 token with '=' padding still reads as a bare token. The same token under
    two names is refused: the actor it records would be a guess. No token is ever echoed."""
    bare: list[str] = []
    named: dict[str, str] = {}
    for value in given:
        name, eq, secret = value.partition("=")
        if eq and secret and not secret.startswith("=") and name and all(c.isalnum() or c in "._-" for c in name):
            if name in named:
                raise click.BadParameter(f"the name {name!r} is given twice", param_hint="--admin-token")
            named[name] = secret
        elif value:
            bare.append(value)
    if len(bare) > 1:
        raise click.BadParameter("give at most one bare token; name the others NAME=TOKEN", param_hint="--admin-token")
    secrets = list(named.values()) + bare
    if len(set(secrets)) != len(secrets):
        raise click.BadParameter("two names share one token: each token must say who uses it",
                                 param_hint="--admin-token")
    return (bare[0] if bare else None), tuple(named.items())


@cli.command()
@kafka_options
@option("--admin-listen", default=None, callback=hostport, metavar="HOST:PORT",
        help="Serve /healthz, /readyz and /metrics here (off by default).")
@option("--session-timeout-ms", default=6000, show_default=True, type=click.IntRange(min=1000),
        help="How long a silent active writer keeps the command partition before a standby takes over.")
@option("--new-log", is_flag=True,
        help="Start this log on purpose (after a reset or a move): gateways holding another log's view adopt it.")
@option("--refold", is_flag=True,
        help="Rebuild the view from the whole command log under a new claim, whatever its checkpoint says.")
@option("--json-logs", is_flag=True, help="Log JSON lines.")
def materialize(kafka: KafkaConfig | None, admin_listen: tuple[str, int] | None, session_timeout_ms: int,
                new_log: bool, refold: bool, json_logs: bool) -> None:
    """Fold the command topic into the compacted view topic (one active writer, others stand by).

    Without a broker it retries, one log line per attempt, like `serve` does."""
    from .control.logs import setup_logging

    kafka = need_kafka(kafka)
    setup_logging(json_lines=json_logs)
    from .materialize import run_retrying

    run_async(run_retrying(kafka, session_timeout_ms=session_timeout_ms, admin_listen=admin_listen,
                                   new_log=new_log, refold=refold))



@cli.command()
@option("--port", default=9092, show_default=True, type=click.IntRange(0, 65535))
def broker(port: int) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, in memory) for development."""
    from .broker import port_in_use, run_broker

    if port and port_in_use(port):
        raise click.ClickException(f"port {port} is already in use on 127.0.0.1: stop what holds it, or pick"
                                   " another with --port (0: a free one)")
    try:
        run_broker(port)
    except RuntimeError as exc:  # no broker binary, or it did not start
        raise click.ClickException(str(exc)) from None


@cli.group()
@kafka_options
@click.pass_context
def ctl(ctx: click.Context, kafka: KafkaConfig | None) -> None:
    """Publish blacklist edits to the command topic, or replay its history."""
    ctx.obj = kafka


def os_user() -> str:
    """Who runs this command, for the `actor` header when --actor is not given."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no USER/LOGNAME (a bare container)
        return f"uid:{os.getuid()}"


def guard_options(command: Callable) -> Callable:
    """--force and the widest prefixes accepted without it (the broad-change guard, blacklist/guard.py)."""
    command = option("--max-prefix-v6", "max_prefix_v6", default=DEFAULT_MAX_PREFIX[6], show_default=True,
                     type=click.IntRange(0, 128), help="The same for IPv6.")(command)
    command = option("--max-prefix", "max_prefix_v4", default=DEFAULT_MAX_PREFIX[4], show_default=True,
                     type=click.IntRange(0, 32), help="Refuse an IPv4 BLACKLIST wider than this prefix unless --force.")(command)
    return option("--force", is_flag=True, allow_from_autoenv=False,
                  help="Publish even what the broad-change guard refuses (a flag only: no environment variable"
                       " can set it).")(command)


def guarded(commands: list[Any], force: bool, limits: Any) -> None:
    """Refuse (one line, exit 2) a BLACKLIST wider than the limits, unless forced."""
    from .blacklist.guard import TooBroad, check_command

    if force:
        return
    for command in commands:
        try:
            check_command(command, limits)
        except TooBroad as exc:
            raise click.UsageError(f"{exc} (--force); nothing was published") from None


def edit_command(action: str) -> click.Command:
    @click.argument("cidr")
    @option("--reason", default=None, help="Why (stored in the record's headers).")
    @option("--actor", default=None, help="Who (stored in the record's headers); default: the OS user.")
    @guard_options
    @timeout_option
    @click.pass_obj
    def edit(kafka: KafkaConfig | None, cidr: str, reason: str | None, actor: str | None, force: bool,
             max_prefix_v4: int, max_prefix_v6: int, timeout: float) -> None:
        from .blacklist.commands import Command, CommandError, parse_network
        from .blacklist.guard import Limits

        kafka = need_kafka(kafka)
        try:
            command = Command(action, parse_network(cidr))  # type: ignore[arg-type]
        except CommandError as exc:
            raise click.BadParameter(str(exc), param_hint="CIDR") from None
        guarded([command], force, Limits(max_prefix_v4=max_prefix_v4, max_prefix_v6=max_prefix_v6))
        actor = actor or os_user()
        sent: list[bool] = []
        offset = run_kafka(
            kafka, lambda: publish_one(kafka, command, sent, actor=actor, reason=reason), timeout=timeout,
            what=lambda: ("It may have been published: look with `gateway ctl replay` before you retry."
                          if sent else "Nothing was published."))
        click.echo(f"{command} -> offset {offset}")

    edit.__doc__ = f"Publish `{action} CIDR` (a bare address means /32 or /128)."
    return edit


async def publish_one(kafka: KafkaConfig, command: Any, sent: list[bool], **headers: Any) -> int:
    """Publish one command; `sent` gets True once it is handed to the producer (from then on a
    failure cannot say it was not published). The producer is closed whatever happens."""
    from .kafka.publisher import Publisher

    publisher = Publisher(kafka)
    try:
        await publisher.start()
        sent.append(True)
        return await publisher.publish(command, **headers)
    finally:
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(publisher.stop()), 1.0)


ctl.command("blacklist")(edit_command("BLACKLIST"))
ctl.command("whitelist")(edit_command("WHITELIST"))


@ctl.command("import")
@click.argument("file", type=click.File("rb"))
@option("--whitelist", "as_whitelist", is_flag=True, allow_from_autoenv=False,
        help="Publish WHITELIST instead of BLACKLIST (a flag only: no environment variable can set it).")
@option("--reason", default=None)
@option("--actor", default=None, help="Who (stored in the records' headers); default: the OS user.")
@guard_options
@option("--max-block-share", default=DEFAULT_MAX_BLOCK_SHARE, show_default=True, type=click.FloatRange(0, 1),
        help="Refuse, unless --force, an import that would newly block more than this share of a family's"
             " address space.")
@option("--max-unblock-share", default=DEFAULT_MAX_UNBLOCK_SHARE, show_default=True, type=click.FloatRange(0, 1),
        help="Refuse, unless --force, an import that would unblock more than this share of what a family has"
             " blocked now (read from the view topic).")
@timeout_option
@click.pass_obj
def import_(kafka: KafkaConfig | None, file: Any, as_whitelist: bool, reason: str | None, actor: str | None,
            force: bool, max_prefix_v4: int, max_prefix_v6: int, max_block_share: float, max_unblock_share: float,
            timeout: float) -> None:
    """Publish every CIDR of FILE (`-`: stdin), all or nothing.

    Formats: one CIDR or address per line; `#` and `;` comments (FireHOL .netset, Spamhaus
    DROP/EDROP, plain lists); a line may also be a whole command (`WHITELIST 10.0.0.0/8`).
    The broad-change guard reads the whole file first and, unless --force, refuses it when it would
    block or unblock too much (the counts are against the view topic as it is now)."""
    import io

    from .blacklist.guard import Limits
    from .kafka.publisher import ImportFileError, import_file, parse_lines

    kafka = need_kafka(kafka)
    actor = actor or os_user()
    action = "WHITELIST" if as_whitelist else "BLACKLIST"
    if not force:
        data = file.read()
        try:
            lines = parse_lines(io.BytesIO(data), action, getattr(file, "name", "<stdin>"))
        except ImportFileError as exc:
            raise click.ClickException(f"{exc} (nothing was published)") from None
        limits = Limits(max_prefix_v4, max_prefix_v6, max_block_share, max_unblock_share)
        import_guard(kafka, lines, limits, timeout)
        file = io.BytesIO(data)
    sending: list[bool] = []
    try:
        result = run_kafka(
            kafka, lambda: import_file(kafka, file, action=action,
                                       actor=actor, reason=reason, timeout=timeout, sending=sending),
            timeout=None, message_timeout=timeout,
            what=lambda: ("Some commands may have been published: look with `gateway ctl replay` before you retry."
                          if sending else "Nothing was published."))
    except ImportFileError as exc:
        raise click.ClickException(f"{exc} (nothing was published)") from None
    if result.count:
        click.echo(f"published {result.count} commands at offsets {result.first_offset}..{result.last_offset}")
    else:
        click.echo("nothing to publish")


def import_guard(kafka: KafkaConfig, lines: list[bytes], limits: Any, timeout: float) -> None:
    """The broad-change guard on a whole import: each line's width, then what the batch changes."""
    from .blacklist.commands import parse_command
    from .blacklist.guard import TooBroad, check_impact, impact
    from .blacklist.ranges import RangeSet

    commands = [parse_command(line) for line in lines]
    guarded(commands, False, limits)
    current = RangeSet()
    if any(c.action == "WHITELIST" for c in commands) or limits.max_block_share < 1:
        from .control.verify import read_view

        current = run_kafka(kafka, lambda: current_view(kafka, read_view), timeout=timeout,
                            what=lambda: "Nothing was published.")
    try:
        check_impact(impact(current, commands), limits)
    except TooBroad as exc:
        raise click.UsageError(f"{exc} (--force); nothing was published") from None


async def current_view(kafka: KafkaConfig, read_view: Callable) -> Any:
    """The view topic as a RangeSet; empty when it does not exist yet (no materializer ever ran):
    counted against nothing, an import's new blocks are over-counted, never under-counted."""
    from .blacklist.ranges import RangeSet
    from .kafka.topics import TopicError

    try:
        return (await read_view(kafka)).load()
    except TopicError:
        return RangeSet()


def address_argument(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, str] | None:
    """An IPv4 or IPv6 address as (family, canonical text); IPv4-mapped IPv6 is taken as IPv4."""
    if value is None:
        return None
    import ipaddress

    from .blacklist.addresses import format_address, parse_address

    try:
        if "%" in value:
            raise ValueError
        version, number = parse_address(value.strip())
    except ValueError:
        raise click.BadParameter(f"not an IPv4 or IPv6 address: {value!r}") from None
    if version == 6 and (mapped := ipaddress.IPv6Address(number).ipv4_mapped) is not None:
        version, number = 4, int(mapped)
    return version, format_address(version, number)


async def read_command_log(kafka: KafkaConfig) -> Any:
    """The whole command log in a CommandIndex (ctl reads it once; the admin API keeps one)."""
    from .control.commandlog import CommandIndex

    index = CommandIndex(kafka)
    try:
        await index.catch_up()
    finally:
        await index.close()
    return index


@ctl.command()
@click.argument("address", callback=address_argument)
@option("--json", "as_json", is_flag=True, help="One JSON object, as GET /admin/explain answers.")
@timeout_option
@click.pass_obj
def explain(kafka: KafkaConfig | None, address: tuple[int, str], as_json: bool, timeout: float) -> None:
    """Who blocked ADDRESS and why: the last command in the log whose range holds it, and the view topic's answer."""
    import json

    from .blacklist.addresses import parse_address
    from .control.verify import read_view

    kafka = need_kafka(kafka)
    version, ip = address

    async def both() -> tuple[Any, Any]:
        return await read_command_log(kafka), await current_view(kafka, read_view)

    index, view = run_kafka(kafka, both, timeout=timeout)
    table = index.table
    position = table.deciding(version, ip)
    row = None if position is None else table.row(position)
    by_log = position is not None and table.blocks(position)
    in_view = view.find(version, parse_address(ip)[1]) is not None
    if as_json:
        decided = None if row is None else {"offset": row.offset, "command": row.command, "time": iso_ms(row.timestamp_ms),
                                            "actor": row.actor, "reason": row.reason, "request_id": row.request_id}
        click.echo(json.dumps({"ip": ip, "blocked": in_view, "decided_by": decided, "blocked_by_log": by_log,
                               "agrees": in_view == by_log}))
        return
    click.echo(f"{ip}: {'blocked' if in_view else 'not blocked'} in the view topic")
    if row is None:
        click.echo("no command in the log ever covered it")
    else:
        click.echo(f"decided by offset {row.offset} at {iso_ms(row.timestamp_ms)}: {row.command}"
                   f" (actor {row.actor or '-'}, reason {row.reason or '-'}, request id {row.request_id or '-'})")
    if in_view != by_log:
        click.echo(f"the view topic and the log disagree: the log says {'blocked' if by_log else 'not blocked'}"
                   " (the materializer may be behind; see `gateway ctl verify`)")


def iso_ms(timestamp_ms: int) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000, timezone.utc).isoformat().replace("+00:00", "Z")


class Since(click.ParamType):
    """A command offset or an ISO 8601 time."""

    name = "OFFSET|ISO-TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | datetime:
        if isinstance(value, (int, datetime)):
            return value
        if value.isascii() and value.isdigit():
            return int(value)
        return IsoTime().convert(value, param, ctx)


@ctl.command("log")
@option("--since", type=Since(), default=None, help="From this command offset or ISO 8601 time on.")
@option("--ip", "address", default=None, callback=address_argument, metavar="ADDR",
        help="Only commands whose range holds ADDR.")
@option("--actor", default=None, help="Only commands published by this actor.")
@option("--limit", default=100, show_default=True, type=click.IntRange(1, 1_000_000), help="At most this many.")
@option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@timeout_option
@click.pass_obj
def log_(kafka: KafkaConfig | None, since: int | datetime | None, address: tuple[int, str] | None,
         actor: str | None, limit: int, as_json: bool, timeout: float) -> None:
    """The command log, newest first, with who published each command and why."""
    import json

    kafka = need_kafka(kafka)
    index = run_kafka(kafka, lambda: read_command_log(kafka), timeout=timeout)
    table = index.table
    if actor is not None and actor not in table.actors:
        known = ", ".join(sorted(table.actors)[:20]) or "none"
        raise click.BadParameter(f"no command in the log was published by {actor!r} (actors: {known})",
                                 param_hint="--actor")
    start = 0
    if isinstance(since, int):
        start = table.first_at_or_after(offset=since)
    elif since is not None:
        start = table.first_at_or_after(time_ms=int(since.timestamp() * 1000))
    shown = 0
    for position in table.newest_first(since=start, actor=actor, address=address):
        row = table.row(position)
        if as_json:
            click.echo(json.dumps({"offset": row.offset, "command": row.command, "time": iso_ms(row.timestamp_ms),
                                   "actor": row.actor, "reason": row.reason, "request_id": row.request_id,
                                   "idempotency_key": row.key, **({} if row.valid else {"poison": True})}))
        else:
            extra = "".join(f" {name}={value}" for name, value in
                            (("reason", row.reason), ("request_id", row.request_id)) if value)
            click.echo(f"{row.offset}\t{iso_ms(row.timestamp_ms)}\t{row.actor or '-'}\t"
                       f"{row.command if row.valid else repr(row.command) + ' (poison)'}{extra}")
        shown += 1
        if shown >= limit:
            break


@ctl.command()
@option("--until", type=IsoTime(), default=None,
        help="Fold the commands published at or before this time (ISO 8601, fractional seconds allowed;"
             " no zone means UTC), as /admin/history?at=TIME.")
@option("--offset", type=click.IntRange(min=0), default=None,
        help="Fold the commands up to and including offset N (the state right after command N),"
             " as /admin/history?at=N.")
@timeout_option
@click.pass_obj
def replay(kafka: KafkaConfig | None, until: datetime | None, offset: int | None, timeout: float) -> None:
    """Print the ranges as they were at a past time or offset (the time machine)."""
    from .blacklist.addresses import format_address
    from .kafka.history import replay as fold_history

    kafka = need_kafka(kafka)
    if (until is None) == (offset is None):
        raise click.UsageError("give either --until TIME or --offset N (one of them, not both)")
    result = run_kafka(kafka, lambda: fold_history(kafka, offset=None if offset is None else offset + 1, until=until),
                       timeout=timeout)
    for version, start, end in result.view.ranges():
        click.echo(f"{format_address(version, start)} {format_address(version, end)}")
    if offset is not None and offset >= result.next_offset:
        end = f"its last offset is {result.next_offset - 1}" if result.next_offset else "it is empty"
        click.echo(f"warning: offset {offset} is past the end of the command log ({end}):"
                   " this is the state after every command", err=True)
    click.echo(f"# {len(result.view)} ranges from {result.commands} commands"
               f" (next offset {result.next_offset}, {result.poison} skipped)", err=True)


@ctl.command()
@option("--gateway", "gateway_url", required=True, metavar="URL", help="The gateway's admin URL (http://HOST:PORT).")
@option("--token", required=True, help="The gateway's admin token.")
@option("--limit", default=10, show_default=True, type=click.IntRange(1, 1000))
@option("--json", "as_json", is_flag=True, help="The answer of GET /admin/top as is.")
def top(gateway_url: str, token: str, limit: int, as_json: bool) -> None:
    """The view ranges refusing the most requests on one gateway, since start and in the last minute."""
    import json

    import aiohttp

    from .control.top import fetch, text

    try:
        body = run_async(asyncio.wait_for(fetch(gateway_url, token, limit), 15))
    except (RuntimeError, aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
        raise click.ClickException(f"cannot read the top ranges from {gateway_url}: {exc or type(exc).__name__}") from None
    click.echo(json.dumps(body) if as_json else text(body))


@ctl.command()
@option("--gateway", "gateway_url", required=True, metavar="URL", help="The gateway's admin URL (http://HOST:PORT).")
@option("--token", required=True, help="The gateway's admin token.")
def adopt(gateway_url: str, token: str) -> None:
    """Make one gateway adopt the log the view topic holds now (it holds its view static after a reset)."""
    from .control.verify import adopt as ask

    click.echo(run_async(ask(gateway_url, token)))


@ctl.command()
@option("--gateway", "gateway_url", default=None, metavar="URL", help="Also compare a live gateway's /admin/ranges.")
@option("--token", default=None, help="The gateway's admin token.")
@click.pass_obj
def verify(kafka: KafkaConfig | None, gateway_url: str | None, token: str | None) -> None:
    """Anti-entropy: fold the command log, compare with the view topic (and a gateway); exit 1 on a difference."""
    from .control.verify import verify as check

    kafka = need_kafka(kafka)
    if gateway_url is not None and token is None:
        raise click.UsageError("--gateway needs --token (the gateway's admin token)")
    report = run_kafka(kafka, lambda: check(kafka, gateway_url=gateway_url, token=token), timeout=None)
    click.echo(report.text())
    sys.exit(0 if report.equal else 1)


@cli.command()
@option("--listen", default="127.0.0.1:9000", show_default=True, callback=hostport)
def bidder(listen: tuple[str, int]) -> None:
    """Run the demo bidder: answers OpenRTB-shaped POSTs with a bid."""
    from .bidder import serve_bidder

    try:
        run_async(serve_bidder(*listen))
    except OSError as exc:  # the port is taken, or the address is not this host's
        if exc.errno == errno.EADDRINUSE:
            raise click.ClickException(f"port {listen[1]} is already in use on {listen[0]}: stop what holds it,"
                                       " or pick another with --listen") from None
        raise click.ClickException(f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc}") from None


@cli.command()
@option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Gateway port.")
@option("--admin-port", default=8081, show_default=True, type=click.IntRange(0, 65535))
@option("--bidder-port", default=9000, show_default=True, type=click.IntRange(0, 65535))
@option("--kafka-port", default=0, show_default=True, type=click.IntRange(0, 65535), help="0: a free port.")
@option("--keep-logs", is_flag=True, help="Keep the children's log folder after a clean stop too.")
def demo(port: int, admin_port: int, bidder_port: int, kafka_port: int, keep_logs: bool) -> None:
    """Run everything on this machine: broker, materializer, demo bidder and gateway (any port 0: a free one)."""
    from .demo import run_demo

    sys.exit(run_demo(port=port, admin_port=admin_port, bidder_port=bidder_port, kafka_port=kafka_port,
                      keep_logs=keep_logs))


name_envvars(cli)


def main() -> None:
    """Run the CLI; a usage error is one line (what is wrong, where --help is), exit 2."""
    try:
        code = cli.main(prog_name="gateway", standalone_mode=False)
    except click.UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"Error: {exc.format_message()}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except BrokenPipeError:  # `gateway ctl replay ... | head`: the reader left (Python's documented way out)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
