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
from .kafka.clients import KafkaAccessError
from .kafka.config import KafkaConfig
from .kafka.materializer import Materializer
from .kafka.topics import TopicError

log = logging.getLogger("gateway.materializer")


async def run(
    kafka: KafkaConfig, *, session_timeout_ms: int = 6_000, admin_listen: tuple[str, int] | None = None,
    new_log: bool = False, refold: bool = False,
) -> None:
    """`gateway materialize`: run one materializer instance until SIGTERM/SIGINT (graceful stop).

    `admin_listen`: where to serve /healthz, /readyz and /metrics (poison records) for probes.
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
    try:
        await materializer.run()
    finally:
        if stop_listener is not None:
            await stop_listener()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


BACKOFF_S = (1.0, 30.0)  # first and longest pause between attempts


async def run_retrying(kafka: KafkaConfig, **settings: Any) -> None:
    """`materialize` until SIGTERM/SIGINT; when the broker cannot be reached or the topics are
    wrong, one WARNING line per attempt and a growing pause, as `serve`'s follower retries."""
    loop = asyncio.get_running_loop()
    delay = BACKOFF_S[0]
    while True:
        try:
            return await run(kafka, **settings)
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
