"""`gateway materialize` as a process: one Materializer, its probes, its signals, its retries.

The fold itself is `gateway.kafka.materializer`; this module is the process model around it
(as server.py is for `gateway serve`), so the log side never imports the control surface.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiokafka.errors import KafkaConnectionError, KafkaError

from .control.metrics import serve_poison_metrics
from .kafka.clients import KafkaAccessError, kafka_problem
from .kafka.config import KafkaConfig
from .kafka.materializer import Materializer
from .kafka.topics import TopicError

log = logging.getLogger("gateway.materializer")


class Attempts:
    """What the metrics listener reads while `materialize` retries: the counters of every
    materializer this process ran (one per attempt), the current one's state, and why the latest
    Kafka client could not connect (gateway_kafka_connection_failing)."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self.kafka = kafka
        self.current: Materializer | None = None
        self._poison = self._fenced = 0

    def begin(self, materializer: Materializer) -> None:
        self.current = materializer

    def end(self) -> None:
        if self.current is not None:
            self._poison += self.current.poison
            self._fenced += self.current.fenced
        self.current = None

    @property
    def poison(self) -> int:
        return self._poison + (self.current.poison if self.current is not None else 0)

    @property
    def fenced(self) -> int:
        return self._fenced + (self.current.fenced if self.current is not None else 0)

    @property
    def active(self) -> bool:
        return self.current is not None and self.current.active

    @property
    def backlog(self) -> int | None:
        return self.current.backlog if self.current is not None else None

    @property
    def refused(self) -> str | None:
        return self.current.refused if self.current is not None else None

    @property
    def kafka_problem(self) -> str | None:
        return kafka_problem(self.kafka)


async def run(
    kafka: KafkaConfig, *, session_timeout_ms: int = 6_000, admin_listen: tuple[str, int] | None = None,
    new_log: bool = False, refold: bool = False, attempts: Attempts | None = None,
) -> None:
    """`gateway materialize`: run one materializer instance until SIGTERM/SIGINT (graceful stop).

    `admin_listen`: where to serve /healthz, /readyz and /metrics (poison records) for probes;
    `attempts`: the retry loop's record instead (its listener outlives each attempt).
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    materializer = Materializer(kafka, session_timeout_ms=session_timeout_ms, new_log=new_log, refold=refold)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, materializer.stop)
    stop_listener = None
    if admin_listen is not None:
        stop_listener = await serve_poison_metrics(*admin_listen, materializer, "materializer")
    if attempts is not None:
        attempts.begin(materializer)
    try:
        await materializer.run()
    finally:
        if attempts is not None:
            attempts.end()
        if stop_listener is not None:
            await stop_listener()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


BACKOFF_S = (1.0, 30.0)  # first and longest pause between attempts


async def run_retrying(kafka: KafkaConfig, *, admin_listen: tuple[str, int] | None = None, **settings: Any) -> None:
    """`materialize` until SIGTERM/SIGINT; when the broker cannot be reached or the topics are
    wrong, one WARNING line per attempt and a growing pause, as `serve`'s follower retries. The
    metrics listener stays up meanwhile and says so (gateway_kafka_connection_failing)."""
    attempts = Attempts(kafka)
    stop_listener = None
    if admin_listen is not None:
        try:
            stop_listener = await serve_poison_metrics(*admin_listen, attempts, "materializer")
        except OSError as exc:
            raise SystemExit(f"Error: cannot listen on {admin_listen[0]}:{admin_listen[1]}: {exc.strerror or exc}") from None
    try:
        await _retry(kafka, attempts, **settings)
    finally:
        if stop_listener is not None:
            await stop_listener()


async def _retry(kafka: KafkaConfig, attempts: Attempts, **settings: Any) -> None:
    loop = asyncio.get_running_loop()
    delay = BACKOFF_S[0]
    while True:
        try:
            return await run(kafka, attempts=attempts, **settings)
        except KafkaAccessError as exc:  # one line naming the cause: unreachable, TLS, SASL
            log.warning("%s (retrying in %g s)", exc, delay)
        except KafkaConnectionError:
            log.warning("cannot connect to Kafka at %s (is --kafka right?); retrying in %g s", kafka.bootstrap, delay)
        except (KafkaError, OSError, TopicError) as exc:
            log.warning("cannot use Kafka at %s: %s; retrying in %g s", kafka.bootstrap,
                        str(exc) or type(exc).__name__, delay)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return
        except (TimeoutError, asyncio.TimeoutError):
            delay = min(delay * 2, BACKOFF_S[1])
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
