"""Publishing commands to the command topic: one at a time (CLI, admin API) or a whole blocklist file.

Commands return nothing but their offset (CQRS). A file is validated completely before the
first record is sent, so a typo on line 900,000 does not leave half a blocklist applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from aiokafka import AIOKafkaProducer

from ..blacklist.commands import (
    ACTIONS,
    BLACKLIST,
    Command,
    CommandError,
    parse_command,
    parse_network,
)
from . import clients
from .config import KafkaConfig
from .topics import ensure_topics

MAX_REPORTED_ERRORS = 20
START_TIMEOUT_S = 10.0  # LazyPublisher: how long the first use waits for the broker


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


COMMENT = re.compile(r"[#;]")  # `#`: FireHOL .netset, plain lists; `;`: Spamhaus DROP/EDROP


def parse_lines(lines: Iterable[bytes | str], default_action: str = BLACKLIST, source: str = "<input>") -> list[bytes]:
    """Parse a blocklist as feeds publish it: one CIDR or address per line, blank lines, and
    comments from `#` or `;` to the end of the line (FireHOL .netset, Spamhaus DROP/EDROP
    `1.10.16.0/20 ; SBL256894`, plain lists; CRLF line ends and a UTF-8 BOM are fine).

    A line may also be a full command (`WHITELIST 10.0.0.0/8`). Returns the commands as they go
    on the topic (canonical text); raises ImportFileError naming every bad line by number.
    """
    commands: list[bytes] = []
    errors: list[tuple[int, str]] = []
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            errors.append((number, f"not UTF-8 text (bad byte at column {exc.start + 1})"))
            continue
        if number == 1:
            line = line.removeprefix("\ufeff")
        line = COMMENT.split(line, 1)[0].strip()
        if not line:
            continue
        try:
            if line.split(None, 1)[0].upper() in ACTIONS:
                commands.append(parse_command(line).encode())
            else:
                commands.append(Command(default_action, parse_network(line)).encode())  # type: ignore[arg-type]
        except CommandError as exc:
            errors.append((number, str(exc)))
    if errors:
        raise ImportFileError(source, errors)
    return commands


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
        """Send what is left; wait until the broker has every record; return their offsets in order.

        On a failure, every batch is still waited for before the first error is raised, so no
        batch of this writer can land after the caller starts repairing.
        """
        if self._count:
            await self._send()
        sent, self._sent = self._sent, []
        results = await asyncio.gather(*(future for future, _ in sent), return_exceptions=True)
        offsets: list[int] = []
        for result, (_, count) in zip(results, sent):
            if isinstance(result, BaseException):
                raise result
            offsets.extend(range(result.offset, result.offset + count))
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
        self._producer = clients.producer(
            kafka, "gateway-publisher",
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


IMPORT_CHUNK = 50_000  # records per flush of an import: the unit a broker must accept within the timeout


async def import_file(
    kafka: KafkaConfig,
    source: str | Path | BinaryIO,
    *,
    action: str = BLACKLIST,
    actor: str | None = None,
    reason: str | None = None,
    timeout: float | None = None,
    sending: list[bool] | None = None,
) -> ImportResult:
    """`gateway ctl import FILE|-`: validate the whole file (a path, or an open binary file such
    as stdin), then publish it in batches.

    Raises ImportFileError (nothing sent) when any line is invalid. `timeout`: how long the
    broker may take to connect and to accept each chunk of IMPORT_CHUNK records (a frozen broker
    is noticed that long after the last progress, however large the file); asyncio.TimeoutError.
    `sending` gets True once records go to the broker: from then on a failure may have published some.
    """
    if isinstance(source, (str, Path)):
        with open(source, "rb") as file:
            commands = parse_lines(file, action, str(source))
    else:
        commands = parse_lines(source, action, getattr(source, "name", "<stdin>"))
    if not commands:
        return ImportResult(0, None, None)
    publisher = Publisher(kafka)
    offsets: list[int] = []
    try:
        await asyncio.wait_for(publisher.start(), timeout)
        if sending is not None:
            sending.append(True)
        for at in range(0, len(commands), IMPORT_CHUNK):
            chunk = commands[at:at + IMPORT_CHUNK]
            offsets += await asyncio.wait_for(publisher.publish_encoded(chunk, actor=actor, reason=reason), timeout)
    finally:  # stopped even when start fails (no unclosed producer); bounded when the broker is frozen
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(publisher.stop()), 1.0 if timeout else None)
    return ImportResult(len(offsets), offsets[0], offsets[-1])


class LazyPublisher:
    """A Publisher started on first use (again after a failed start): the admin API comes up while the broker is down."""

    def __init__(self, kafka: Any) -> None:
        self.kafka = kafka
        self._publisher: Publisher | None = None
        self._lock = asyncio.Lock()

    @property
    def started(self) -> bool:
        """Whether the producer is up; a failure while it is not sent nothing (admin API's 503)."""
        return self._publisher is not None

    async def publish(self, command: Any, **headers: Any) -> int:
        async with self._lock:
            if self._publisher is None:
                publisher = Publisher(self.kafka)
                try:
                    await asyncio.wait_for(publisher.start(), START_TIMEOUT_S)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await publisher.stop()
                    raise
                self._publisher = publisher
        return await self._publisher.publish(command, **headers)

    async def stop(self) -> None:
        if self._publisher is not None:
            await self._publisher.stop()
            self._publisher = None
