"""The `gateway` command line. Every flag also reads the environment variable GATEWAY_<FLAG>."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from .config import DEFAULT_COMMANDS_TOPIC, DEFAULT_RANGES_TOPIC, KafkaConfig, ServeConfig, parse_hostport


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
@option("--openrtb", is_flag=True, help="Also check device.ip/device.ipv6; answer 204 (no bid) when blocked.")
@option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
@option("--snapshot", default=None, metavar="PATH", help="Snapshot file of the view, for instant restarts.")
@option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(min=0))
@option("--max-in-flight", default=512, show_default=True, type=click.IntRange(min=1))
@option("--access-log", is_flag=True, help="Log every request.")
@option("--json-logs", is_flag=True, help="Log JSON lines.")
def serve(kafka: KafkaConfig, upstreams: tuple[str, ...], trusted_proxies: tuple[str, ...], **settings: Any) -> None:
    """Run the gateway: follow the view, block blacklisted clients, forward the rest."""
    from .server import run

    run(ServeConfig(kafka=kafka, upstreams=upstreams, trusted_proxies=trusted_proxies, **settings))


@cli.command()
@kafka_options
def materialize(kafka: KafkaConfig) -> None:
    """Fold the command topic into the compacted view topic (one active writer)."""
    from .materializer import materialize as run

    run_async(run(kafka))


@cli.command()
@option("--port", default=9092, show_default=True, type=click.IntRange(0, 65535))
def broker(port: int) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, in memory) for development."""
    from .broker import run_broker

    run_broker(port)


def main() -> None:
    cli(prog_name="gateway")


if __name__ == "__main__":
    sys.exit(main())
