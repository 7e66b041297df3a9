"""The `gateway` command line. Every flag also reads the environment variable GATEWAY_<FLAG>."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from .http.config import ServeConfig
from .kafka.config import (
    DEFAULT_COMMANDS_TOPIC,
    DEFAULT_RANGES_TOPIC,
    KafkaConfig,
    parse_hostport,
)


def option(*names: str, **kwargs: Any) -> Callable:
    """A click option whose environment variable is GATEWAY_<LONG NAME>."""
    long_name = next(n for n in names if n.startswith("--"))
    envvar = "GATEWAY_" + long_name[2:].upper().replace("-", "_")
    return click.option(*names, envvar=envvar, show_envvar=True, **kwargs)


def kafka_options(command: Callable) -> Callable:
    """The options every Kafka client shares, gathered into one KafkaConfig argument."""

    @option("--kafka", required=True, metavar="HOST:PORT", help="Kafka bootstrap servers.")
    @option("--commands-topic", default=DEFAULT_COMMANDS_TOPIC, show_default=True)
    @option("--ranges-topic", default=DEFAULT_RANGES_TOPIC, show_default=True)
    @functools.wraps(command)
    def wrapper(kafka: str, commands_topic: str, ranges_topic: str, **kwargs: Any) -> Any:
        return command(KafkaConfig(kafka, commands_topic, ranges_topic), **kwargs)

    return wrapper


def hostport(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    try:
        return parse_hostport(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def run_async(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Ad-exchange request gateway with an event-sourced IP blacklist."""


@cli.command()
@kafka_options
@option("--listen", default="0.0.0.0:8080", show_default=True, callback=hostport, help="Proxy listener.")
@option("--upstream", "upstreams", multiple=True, required=True, metavar="URL", help="Bidder URL (repeatable).")
@option("--admin-listen", default="127.0.0.1:8081", show_default=True, callback=hostport)
@option("--admin-token", default=None, help="Bearer token for /admin/* (required for admin routes).")
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
@option("--access-log", is_flag=True, help="Log every request.")
@option("--json-logs", is_flag=True, help="Log JSON lines.")
def serve(kafka: KafkaConfig, upstreams: tuple[str, ...], trusted_proxies: tuple[str, ...], **settings: Any) -> None:
    """Run the gateway: follow the view, block blacklisted clients, forward the rest."""
    from .server import ListenError, run

    try:
        run(ServeConfig(kafka=kafka, upstreams=upstreams, trusted_proxies=trusted_proxies, **settings))
    except ListenError as exc:  # one line, non-zero exit, before any worker exists
        raise click.ClickException(str(exc)) from None


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
def materialize(kafka: KafkaConfig, admin_listen: tuple[str, int] | None, session_timeout_ms: int,
                new_log: bool, refold: bool) -> None:
    """Fold the command topic into the compacted view topic (one active writer, others stand by)."""
    from .kafka.materializer import materialize as run

    run_async(run(kafka, session_timeout_ms=session_timeout_ms, admin_listen=admin_listen,
                  new_log=new_log, refold=refold))


@cli.command()
@option("--port", default=9092, show_default=True, type=click.IntRange(0, 65535))
def broker(port: int) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, in memory) for development."""
    from .broker import run_broker

    run_broker(port)


@cli.group()
@kafka_options
@click.pass_context
def ctl(ctx: click.Context, kafka: KafkaConfig) -> None:
    """Publish blacklist edits to the command topic, or replay its history."""
    ctx.obj = kafka


def edit_command(action: str) -> click.Command:
    @click.argument("cidr")
    @option("--reason", default=None, help="Why (stored in the record's headers).")
    @option("--actor", default=None, help="Who (stored in the record's headers).")
    @click.pass_obj
    def edit(kafka: KafkaConfig, cidr: str, reason: str | None, actor: str | None) -> None:
        from .blacklist.commands import Command, CommandError, parse_network
        from .kafka.publisher import publish

        try:
            command = Command(action, parse_network(cidr))  # type: ignore[arg-type]
        except CommandError as exc:
            raise click.BadParameter(str(exc), param_hint="CIDR") from None
        offset = run_async(publish(kafka, command, actor=actor, reason=reason))
        click.echo(f"{command} -> offset {offset}")

    edit.__doc__ = f"Publish `{action} CIDR` (a bare address means /32 or /128)."
    return edit


ctl.command("blacklist")(edit_command("BLACKLIST"))
ctl.command("whitelist")(edit_command("WHITELIST"))


@ctl.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@option("--whitelist", "as_whitelist", is_flag=True, help="Publish WHITELIST instead of BLACKLIST.")
@option("--reason", default=None)
@option("--actor", default=None)
@click.pass_obj
def import_(kafka: KafkaConfig, file: str, as_whitelist: bool, reason: str | None, actor: str | None) -> None:
    """Publish every CIDR of FILE (one per line, # comments; FireHOL .netset), all or nothing."""
    from .kafka.publisher import ImportFileError, import_file

    try:
        result = run_async(import_file(kafka, file, action="WHITELIST" if as_whitelist else "BLACKLIST",
                                       actor=actor, reason=reason))
    except ImportFileError as exc:
        raise click.ClickException(f"{exc} (nothing was published)") from None
    if result.count:
        click.echo(f"published {result.count} commands at offsets {result.first_offset}..{result.last_offset}")
    else:
        click.echo("nothing to publish")


@ctl.command()
@option("--until", type=click.DateTime(["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d"]), default=None,
        help="Fold the commands published at or before this time (ISO 8601; no zone means UTC).")
@option("--offset", type=click.IntRange(min=0), default=None,
        help="Fold the first N commands (offsets 0..N-1; /admin/history?at=N includes N).")
@click.pass_obj
def replay(kafka: KafkaConfig, until: Any, offset: int | None) -> None:
    """Print the ranges as they were at a past time or offset (the time machine)."""
    from .blacklist.addresses import format_address
    from .kafka.history import replay as fold_history

    if until is None and offset is None:
        raise click.UsageError("give --until TIME or --offset N")
    result = run_async(fold_history(kafka, offset=offset, until=until))
    for version, start, end in result.view.ranges():
        click.echo(f"{format_address(version, start)} {format_address(version, end)}")
    click.echo(f"# {len(result.view)} ranges from {result.commands} commands"
               f" (next offset {result.next_offset}, {result.poison} skipped)", err=True)


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
def verify(kafka: KafkaConfig, gateway_url: str | None, token: str | None) -> None:
    """Anti-entropy: fold the command log, compare with the view topic (and a gateway); exit 1 on a difference."""
    from .control.verify import verify as check

    if gateway_url is not None and token is None:
        raise click.UsageError("--gateway needs --token (the gateway's admin token)")
    report = run_async(check(kafka, gateway_url=gateway_url, token=token))
    click.echo(report.text())
    sys.exit(0 if report.equal else 1)


@cli.command()
@option("--listen", default="127.0.0.1:9000", show_default=True, callback=hostport)
def bidder(listen: tuple[str, int]) -> None:
    """Run the demo bidder: answers OpenRTB-shaped POSTs with a bid."""
    from .bidder import serve_bidder

    run_async(serve_bidder(*listen))


@cli.command()
@option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Gateway port.")
@option("--admin-port", default=8081, show_default=True, type=click.IntRange(0, 65535))
@option("--bidder-port", default=9000, show_default=True, type=click.IntRange(0, 65535))
@option("--kafka-port", default=0, show_default=True, type=click.IntRange(0, 65535), help="0: a free port.")
def demo(port: int, admin_port: int, bidder_port: int, kafka_port: int) -> None:
    """Run everything on this machine: broker, materializer, demo bidder and gateway."""
    from .demo import run_demo

    sys.exit(run_demo(port=port, admin_port=admin_port, bidder_port=bidder_port, kafka_port=kafka_port))


def main() -> None:
    cli(prog_name="gateway")


if __name__ == "__main__":
    main()
