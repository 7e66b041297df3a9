"""`gateway serve`: a supervisor process and N worker processes sharing the proxy port.

The supervisor binds and listens on the proxy address and the admin address before it
forks anything: a taken address fails at once, with one line and a non-zero exit, and no
worker is left behind. There is one listening socket, inherited by the workers, which all
accept on it; no SO_REUSEPORT, so no other process can join the port (a second `gateway
serve` on it fails with "address already in use" instead of taking part of the traffic).
Workers die with the supervisor: each asks the kernel for SIGKILL when its parent dies
(PR_SET_PDEATHSIG) and checks the parent is still the one that forked it, so no orphan
ever serves with a view nobody administers.

One view per host: the supervisor bootstraps the view (or loads the snapshot) with its
follower, and only then forks the workers. A worker inherits the view, the index and the
follower's offsets and reader state copy-on-write (gateway/kafka/follower.py,
Follower.inherit): it is ready at once and follows the view topic from where the supervisor
was. Before each fork the supervisor freezes its heap for the garbage collector
(gc.freeze), so no collection in any process writes to the shared pages; a lookup reads
the trie's C nodes and writes nothing there either. So the host holds one view, plus what
each process changed since. A worker that dies is forked again from the supervisor's
current view and is ready at once. Until the supervisor has a view (no snapshot, broker
not answered yet), standby workers hold the proxy port and answer 503: they have no view
and follow nothing, and they drain and go once the view is there.

Each worker runs uvloop, its follower of the view and the proxy. The supervisor runs the
admin listener with its own follower (gateway/control/admin.py), gathers the workers'
metrics, restarts a worker that dies, and on SIGTERM or SIGINT tells every worker to
drain: stop accepting, close idle keep-alive connections, answer what is in flight (with
`Connection: close`), then exit. SIGHUP reloads the TLS certificates (gateway/http/tls.py):
the supervisor its admin pair, each worker, told by the supervisor, its proxy pair.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.process import BaseProcess

import uvloop
from aiohttp import web

from .blacklist.ranges import RangeSet
from .control.admin import make_admin_app
from .control.logs import setup_logging
from .control.metrics import Flusher, Metrics, multiprocess_dir, worker_exited
from .control.progress import WorkerProgress
from .http.config import ServeConfig
from .http.engines import make_engine
from .http.proxy import ACCESS, Stats
from .http.tls import Reloadable, TlsError, TlsFiles
from .kafka.follower import Follower
from .kafka.publisher import LazyPublisher
from .kafka.snapshot import keep_writing
from .kafka.snapshot import load as load_snapshot

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 1.0  # a worker that dies sooner than this after its start is restarted after a pause
_FORK = multiprocessing.get_context("fork")
_PR_SET_PDEATHSIG = 1


class ListenError(Exception):
    """A listener could not be opened; str() is the one line to show."""


def run(config: ServeConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain the workers and return (blocking).

    Raises ListenError, before any worker exists, when an address cannot be listened on.
    """
    setup_logging(json_lines=config.json_logs, access_log=config.access_log)
    sock = listen_socket(*config.listen)
    try:
        admin_sock = listen_socket(*config.admin_listen)
    except ListenError:
        sock.close()
        raise
    try:
        with multiprocess_dir():
            try:
                supervisor = Supervisor(config, sock, admin_sock)
            except TlsError as exc:  # the files changed since the command line checked them
                raise ListenError(str(exc)) from None
            try:
                uvloop.run(supervisor.run())  # forks the workers once it holds the view
            finally:
                supervisor.kill_workers()  # only left alive if the supervisor failed
    finally:
        sock.close()
        admin_sock.close()


def listen_socket(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A listening TCP socket on host:port (dual-stack when host is IPv6), or ListenError.

    SO_REUSEADDR only lets a restart bind past connections in TIME_WAIT; on Linux it never
    lets a second socket listen on a port already listened on.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc)).lower()
        raise ListenError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def die_with_parent(parent: int) -> None:
    """In a worker: SIGKILL when the supervisor dies; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent check below still runs
        pass
    if os.getppid() != parent:  # the supervisor died between the fork and the prctl
        os._exit(1)


def drain_timeout_s(config: ServeConfig) -> float:
    """Long enough for a request just begun to be read and answered."""
    return config.request_timeout_s + config.budget_ms / 1000.0 + 0.5


# -- the supervisor -----------------------------------------------------------------------------

class Supervisor:
    def __init__(self, config: ServeConfig, sock: socket.socket, admin_sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.admin_sock = admin_sock
        self.port = sock.getsockname()[1]
        self.progress = WorkerProgress(config.workers)
        self.workers: list[BaseProcess | None] = [None] * config.workers
        self.started: list[float] = [0.0] * config.workers
        self.follower: Follower | None = None  # the view every worker is forked from
        # The proxy's TLS pair, reloaded here on SIGHUP too: a worker forked later inherits the
        # last pair that loaded, never files a bad rotation left on disk.
        self.proxy_tls = reloadable(config.tls, "proxy")
        self.retiring: list[BaseProcess] = []  # standby workers draining since the view came
        self.stopping = False

    def start_workers(self) -> None:
        for slot in range(self.config.workers):
            self.start_worker(slot)

    def start_worker(self, slot: int) -> None:
        """Fork the worker of `slot`: from the supervisor's view when it has one, else a standby (503s)."""
        shared = self.follower if self.follower is not None and self.follower.ready.is_set() else None
        if shared is not None:
            freeze_heap()
        process = _FORK.Process(target=worker_main, args=(slot, self.config, self.sock, self.admin_sock.fileno(),
                                                          os.getpid(), self.progress, shared, self.proxy_tls),
                                name=f"gateway-worker-{slot}", daemon=False)
        process.start()
        self.workers[slot] = process
        self.started[slot] = time.monotonic()
        asyncio.get_running_loop().add_reader(process.sentinel, self._exited, slot, process)
        log.info("worker %d started%s", slot, "" if shared is not None else " (standby until the view is read)",
                 extra={"pid": process.pid, "port": self.port})

    async def share_view(self) -> None:
        """Once the supervisor's follower holds the view: fork every worker from it; the standbys drain and go."""
        await self.follower.ready.wait()
        if self.stopping:
            return
        standbys = [p for p in self.workers if p is not None and p.exitcode is None]
        self.start_workers()
        for process in standbys:  # the new workers accept already: the port is never unserved
            self.retiring.append(process)
            os.kill(process.pid, signal.SIGTERM)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        admin_tls = reloadable(self.config.admin_tls, "admin")
        loop.add_signal_handler(signal.SIGHUP, self.reload_tls, admin_tls)

        follower, baseline = start_follower(self.config)
        self.follower = follower
        publisher = LazyPublisher(self.config.kafka)
        metrics = Metrics()
        waiting = not follower.ready.is_set()  # ready here: loaded from the snapshot
        self.start_workers()  # sharing the view, or standbys until the follower has read it
        tasks = [
            asyncio.create_task(follower.run()),
            asyncio.create_task(Flusher(metrics, None, follower, reader="admin", baseline=baseline).run()),
        ]
        if waiting:
            tasks.append(asyncio.create_task(self.share_view()))
        if self.config.snapshot:  # cancelling it writes one last snapshot
            tasks.append(asyncio.create_task(keep_writing(self.config.snapshot, follower, self.config.kafka)))
        app = make_admin_app(self.config, follower, publisher, progress=self.progress,
                             registry=metrics.registry, baseline=baseline)
        admin = web.AppRunner(app, access_log=ACCESS if self.config.access_log else None, handle_signals=False)
        await admin.setup()
        await web.SockSite(admin, self.admin_sock, ssl_context=admin_tls.context if admin_tls else None).start()
        log.info("serving", extra={"listen": f"{self.config.listen[0]}:{self.port}", "workers": self.config.workers,
                                   "admin": "%s:%d" % self.config.admin_listen})
        try:
            await stop.wait()
            log.info("stopping: draining the workers")
            await self.stop_workers()
        finally:
            follower.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await admin.cleanup()
            await publisher.stop()
        log.info("stopped")

    def reload_tls(self, admin_tls: Reloadable | None) -> None:
        """SIGHUP: reload the admin listener's certificate and the proxy's (the pair a worker forked
        from now inherits), and have every worker reload the proxy's."""
        log.info("SIGHUP: reloading TLS certificates")
        for tls in (admin_tls, self.proxy_tls):
            if tls is not None:
                tls.reload()
        for process in self.workers:
            if process is not None and process.exitcode is None:
                os.kill(process.pid, signal.SIGHUP)

    def _exited(self, slot: int, process: BaseProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        process.join()
        worker_exited(process.pid)
        if process is not self.workers[slot]:  # a standby that drained after the view came
            if process in self.retiring:
                self.retiring.remove(process)
            return
        self.progress.reset(slot)
        if self.stopping:
            return
        log.error("worker %d exited unexpectedly (code %s); restarting it", slot, process.exitcode,
                  extra={"pid": process.pid})
        delay = RESTART_BACKOFF_S if time.monotonic() - self.started[slot] < RESTART_BACKOFF_S else 0.0
        loop.call_later(delay, self._restart, slot, process)

    def _restart(self, slot: int, process: BaseProcess) -> None:
        if self.stopping or self.workers[slot] is not process:  # stopping, or already replaced
            return
        self.start_worker(slot)  # from the supervisor's current view: ready at once

    def _processes(self) -> list[BaseProcess]:
        return [p for p in [*self.workers, *self.retiring] if p is not None and p.exitcode is None]

    def kill_workers(self) -> None:
        """SIGKILL every worker still alive (the supervisor is failing, not draining)."""
        self.stopping = True
        for process in self._processes():
            process.kill()
            process.join()

    async def stop_workers(self) -> None:
        """SIGTERM every worker and wait for them to drain; kill those that do not in time."""
        self.stopping = True
        alive = self._processes()
        for process in alive:
            os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + drain_timeout_s(self.config) + 5.0
        while any(p.exitcode is None for p in alive) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for process in alive:
            if process.exitcode is None:
                log.error("worker did not drain in time; killing it", extra={"pid": process.pid})
                process.kill()
                process.join()


def reloadable(files: TlsFiles | None, name: str) -> Reloadable | None:
    """A listener's TLS context, reloaded on SIGHUP; None when it serves plain HTTP."""
    return Reloadable(files, name) if files is not None else None


def freeze_heap() -> None:
    """Before forking a worker that shares the view: keep the shared pages shared.

    gc.freeze() moves every object alive now out of the collector's generations, so no
    collection in the supervisor or a worker writes to them (a collection writes into the
    header of every object it visits); malloc_trim hands the bootstrap's freed buffers back
    to the OS rather than to the children, where reusing them would copy the pages."""
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def start_follower(config: ServeConfig) -> tuple[Follower, float | None]:
    """This process's follower, starting from the snapshot when one is configured and fresh;
    and the snapshot's time (None without one)."""
    snapshot = load_snapshot(config.snapshot, config.kafka.ranges_topic) if config.snapshot else None
    if snapshot is None:
        return Follower(config.kafka), None
    view = RangeSet.from_view(snapshot.records)
    trusted_until = snapshot.written_at + snapshot.delete_retention_ms / 1000
    return Follower(config.kafka, initial=(view, snapshot.offsets), trusted_until=trusted_until,
                    claim=snapshot.claim, signatures=snapshot.signatures), snapshot.written_at


# -- a worker -----------------------------------------------------------------------------------

def worker_main(slot: int, config: ServeConfig, sock: socket.socket, admin_fd: int, parent: int,
                progress: WorkerProgress, shared: Follower | None = None, tls: Reloadable | None = None) -> None:
    """Entry of a forked worker process. `shared`: the supervisor's follower, whose view this worker
    inherits and follows on; None: a standby that answers 503 until the supervisor has a view."""
    die_with_parent(parent)
    os.close(admin_fd)  # the supervisor's listener: a worker must never hold the admin port
    # A worker is forked from inside the supervisor's event loop; it runs its own.
    asyncio.events._set_running_loop(None)
    signal.set_wakeup_fd(-1)  # the supervisor loop's: a signal to this worker must not wake the supervisor
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload forwarded before our loop listens must not kill us
    setup_logging(json_lines=config.json_logs, access_log=config.access_log)
    if shared is None:
        uvloop.run(serve_worker(slot, config, sock, None, Follower(config.kafka), follow=False, tls=tls))
    else:
        uvloop.run(serve_worker(slot, config, sock, progress, Follower.inherit(shared), tls=tls))


async def serve_worker(slot: int, config: ServeConfig, sock: socket.socket,
                       progress: WorkerProgress | None = None, follower: Follower | None = None,
                       follow: bool = True, tls: Reloadable | None = None) -> None:
    """Follow the view and proxy on the inherited listening socket until SIGTERM/SIGINT, then drain.

    `follower`: the view to serve (inherited from the supervisor); None: bootstrap one here.
    `follow=False`: a standby, serving a view it never reads (503 until replaced).
    `tls`: the proxy's TLS pair, inherited from the supervisor; this worker reloads it on SIGHUP."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    baseline = None
    if follower is None:
        follower, baseline = start_follower(config)
    stats = Stats()
    proxy = make_engine(config, follower, stats)
    tasks = [
        asyncio.create_task(Flusher(Metrics(), stats, follower, baseline=baseline).run()),
    ]
    if follow:
        tasks.append(asyncio.create_task(follower.run()))
    if progress is not None:
        tasks.append(asyncio.create_task(progress.report(slot, follower)))
    if tls is not None:
        loop.add_signal_handler(signal.SIGHUP, tls.reload)
    server = await proxy.serve(sock, ssl=tls.context if tls else None)
    try:
        await stop.wait()
    finally:
        server.close()  # stop accepting; accepted connections go on
        drained = await proxy.drain(drain_timeout_s(config))
        log.info("%sworker %d drained%s", "" if follow else "standby ", slot,
                 "" if drained else " (connections cut at the timeout)", extra=stats.outcomes())
        follower.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
