"""The one place a front-door engine is chosen by name (`gateway serve --engine`).

Both engines take `(config, view, stats)`, `await serve(sock, ssl=None)` and
`await drain(timeout_s) -> bool`, so the process model never knows which one runs.
"""

from __future__ import annotations

from .config import ServeConfig

ENGINES = ("fast", "aiohttp")
DEFAULT = "fast"  # wins the bench while passing the same suite (README "Front-door engines")


def engine_class(name: str) -> type:
    """The engine class for `name`; imported on demand, so a worker loads only its own."""
    if name == "fast":
        from .proxy import Proxy

        return Proxy
    if name == "aiohttp":
        from .aioengine import AiohttpEngine

        return AiohttpEngine
    raise ValueError(f"unknown engine {name!r}: one of {', '.join(ENGINES)}")


def make_engine(config: ServeConfig, view, stats=None):
    """The configured engine (`config.engine`) over `view`, counting in `stats`."""
    return engine_class(config.engine)(config, view, stats)
