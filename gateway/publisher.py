"""Publishing commands to the command topic: one at a time (CLI, admin API) or a whole blocklist file.

Commands return nothing but their offset (CQRS). A file is validated completely before the
first record is sent, so a typo on line 900,000 does not leave half a blocklist applied.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaProducer

from .commands import ACTIONS, BLACKLIST, MAX_COMMAND_BYTES, Command, CommandError, parse_command, parse_network
from .config import KafkaConfig
from .topics import ensure_topics

MAX_REPORTED_ERRORS = 20
_ACTIONS_BYTES = {action.encode() for action in ACTIONS}


class ImportFileError(ValueError):
    """A blocklist file with invalid lines; nothing was sent. The message names every bad line (up to 20)."""

    def __init__(self, path: str, errors: list[tuple[int, str]]) -> None:
        self.errors = errors
        shown = "\n".join(f"  line {n}: {message}" for n, message in errors[:MAX_REPORTED_ERRORS])
        more = len(errors) - MAX_REPORTED_ERRORS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{path}: {len(errors)} invalid line(s), nothing sent:\n{shown}{tail}")


@dataclass(frozen=True, slots=True)
class ImportResult:
    count: int
    first_offset: int | None
    last_offset: int | None


def parse_lines(lines: Iterable[bytes | str], default_action: str = BLACKLIST, source: str = "<input>") -> list[bytes]:
    """Parse a FireHOL .netset-style file: one CIDR or address per line, `#` comments, blank lines.

    A line may also be a full command (`WHITELIST 10.0.0.0/8`). Returns the commands as they go
    on the topic (canonical text); raises ImportFileError naming every bad line by number.
    """
    commands: list[bytes] = []
    errors: list[tuple[int, str]] = []
    prefix = f"{default_action} "
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            errors.append((number, f"not UTF-8 text (bad byte at column {exc.start + 1})"))
            continue
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            cidr = _canonical_ipv4(line)
            if cidr is not None:
                commands.append((prefix + cidr).encode())
            elif line.split(None, 1)[0].upper() in ACTIONS:
                commands.append(parse_command(line).encode())
            else:
                commands.append(Command(default_action, parse_network(line)).encode())  # type: ignore[arg-type]
        except CommandError as exc:
            errors.append((number, str(exc)))
    if errors:
        raise ImportFileError(source, errors)
    return commands


def _ipv4_prefix(text: str) -> tuple[int, int] | None:
    """(network, prefix length) of a canonical IPv4 address or CIDR, without the ipaddress parser
    (the common case of blocklists and of the command topic). None for anything else: then
    parse_network decides, and names the error."""
    address, slash, length = text.partition("/")
    try:
        packed = socket.inet_pton(socket.AF_INET, address)
    except OSError:
        return None
    if socket.inet_ntoa(packed) != address:
        return None
    if not slash:
        bits = 32
    elif length.isascii() and length.isdigit() and int(length) <= 32:
        bits = int(length)
    else:
        return None
    value = int.from_bytes(packed, "big")
    if value & ((1 << (32 - bits)) - 1):
        return None
    return value, bits


def _canonical_ipv4(text: str) -> str | None:
    prefix = _ipv4_prefix(text)
    return None if prefix is None else f"{text.partition('/')[0]}/{prefix[1]}"


def parse_command_fast(raw: bytes) -> Command:
    """parse_command, 3x faster for canonical IPv4 commands (the materializer's hot loop)."""
    action, space, cidr = raw.partition(b" ")
    if space and action in _ACTIONS_BYTES and len(raw) <= MAX_COMMAND_BYTES:
        try:
            prefix = _ipv4_prefix(cidr.decode("ascii"))
        except UnicodeDecodeError:
            prefix = None
        if prefix is not None:
            return Command(action.decode(), ipaddress.IPv4Network(prefix))  # type: ignore[arg-type]
    return parse_command(raw)


class BatchWriter:
    """Appends records to one partition in order through whole producer batches, then waits for them all.

    Far cheaper per record than `producer.send()` (no future and task per record): what lets the
    materializer and `ctl import` keep up with their targets.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str, partition: int = 0) -> None:
        self._producer, self._topic, self._partition = producer, topic, partition
        self._builder = producer.create_batch()
        self._count = 0
        self._sent: list[tuple[asyncio.Future, int]] = []

    async def append(self, key: bytes | None, value: bytes | None, headers: list, timestamp_ms: int | None = None) -> None:
        while self._builder.append(timestamp=timestamp_ms, key=key, value=value, headers=headers) is None:
            if not self._count:
                raise ValueError("record larger than a producer batch")
            await self._send()
        self._count += 1

    async def flush(self) -> list[int]:
        """Send what is left; wait until the broker has every record; return their offsets in order."""
        if self._count:
            await self._send()
        sent, self._sent = self._sent, []
        offsets: list[int] = []
        for future, count in sent:
            base = (await future).offset
            offsets.extend(range(base, base + count))
        return offsets

    async def _send(self) -> None:
        future = await self._producer.send_batch(self._builder, self._topic, partition=self._partition)
        self._sent.append((future, self._count))
        self._builder, self._count = self._producer.create_batch(), 0


class Publisher:
    """A producer for the command topic; `async with Publisher(kafka) as p: await p.publish(cmd)`."""

    def __init__(self, kafka: KafkaConfig, *, create_topics: bool = True) -> None:
        self.kafka = kafka
        self._create_topics = create_topics
        self._producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap,
            client_id="gateway-publisher",
            acks="all",
            linger_ms=0,  # single commands go at once; bulk sends build whole batches (BatchWriter)
            max_batch_size=1 << 20,
        )

    async def start(self) -> None:
        if self._create_topics:  # first: a producer's metadata request could auto-create it wrongly
            await ensure_topics(self.kafka)
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def publish(
        self,
        command: Command | str,
        *,
        key: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        request_id: str | None = None,
    ) -> int:
        """Send one command (validated first); return its offset once the broker has it."""
        future = await self._send(command, key, _headers(actor, reason, request_id))
        return (await future).offset

    async def publish_many(
        self, commands: Iterable[Command], *, actor: str | None = None, reason: str | None = None
    ) -> list[int]:
        """Send commands in order, in whole batches; return their offsets."""
        return await self.publish_encoded((command.encode() for command in commands), actor=actor, reason=reason)

    async def publish_encoded(self, values: Iterable[bytes], *, actor: str | None = None, reason: str | None = None) -> list[int]:
        """Send commands already validated and encoded (parse_lines), in whole batches; return their offsets."""
        headers = _headers(actor, reason, None)
        writer = BatchWriter(self._producer, self.kafka.commands_topic)
        for value in values:
            await writer.append(None, value, headers)
        return await writer.flush()

    async def _send(self, command: Command | str, key: str | None, headers: list[tuple[str, bytes]]):
        if isinstance(command, str):
            command = parse_command(command)
        return await self._producer.send(
            self.kafka.commands_topic,
            command.encode(),
            key=key.encode() if key is not None else None,
            headers=headers,
            partition=0,
        )


def _headers(actor: str | None, reason: str | None, request_id: str | None) -> list[tuple[str, bytes]]:
    pairs = (("actor", actor), ("reason", reason), ("request-id", request_id))
    return [(name, value.encode()) for name, value in pairs if value is not None]


async def publish(
    kafka: KafkaConfig,
    command: Command | str,
    *,
    key: str | None = None,
    actor: str | None = None,
    reason: str | None = None,
    request_id: str | None = None,
) -> int:
    """`gateway ctl blacklist|whitelist`: publish one command, return its offset."""
    async with Publisher(kafka) as publisher:
        return await publisher.publish(command, key=key, actor=actor, reason=reason, request_id=request_id)


async def import_file(
    kafka: KafkaConfig,
    path: str | Path,
    *,
    action: str = BLACKLIST,
    actor: str | None = None,
    reason: str | None = None,
) -> ImportResult:
    """`gateway ctl import FILE`: validate the whole file, then publish it in batches.

    Raises ImportFileError (nothing sent) when any line is invalid.
    """
    with open(path, "rb") as file:
        commands = parse_lines(file, action, str(path))
    if not commands:
        return ImportResult(0, None, None)
    async with Publisher(kafka) as publisher:
        offsets = await publisher.publish_encoded(commands, actor=actor, reason=reason)
    return ImportResult(len(offsets), offsets[0], offsets[-1])
