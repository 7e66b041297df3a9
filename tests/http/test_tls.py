"""HTTPS on the front door and the admin listener, over real TLS connections on loopback.

The certificates come from a throwaway CA (trustme). The conformance cases of
test_conformance.py run again, byte for byte, through a TLS client; the reload tests run
a real `gateway serve` process with a real broker and send SIGHUP to its supervisor.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from helpers import eventually, free_port
from liveserve import gateway_process
from proxyrig import Recorder, get, ranges, read_response, start_bidder, start_gateway
from test_conformance import CASES, Case, send

from gateway.http.tls import Reloadable, TlsFiles, server_context

# -- certificates -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, directory: Path, name: str = "gw", stem: str = "server") -> tuple[TlsFiles, bytes]:
    """Issue a certificate for 127.0.0.1 and write it (chain, key) under `stem`, replacing
    any previous pair atomically; the files and the leaf's DER."""
    issued = ca.issue_cert("127.0.0.1", "localhost", common_name=name)
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    for path, blob in ((cert, b"".join(p.bytes() for p in issued.cert_chain_pems)),
                       (key, issued.private_key_pem.bytes())):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    return TlsFiles(str(cert), str(key)), leaf_der(issued)


def leaf_der(issued: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())


def client_context(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    return context


async def connect(port: int, context: ssl.SSLContext, local: str | None = None):
    return await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=context, local_addr=(local, 0) if local else None), 5)


def peer_der(writer: asyncio.StreamWriter) -> bytes:
    return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)


async def ask(reader, writer, data: bytes = get("/bid")) -> int:
    writer.write(data)
    return (await asyncio.wait_for(read_response(reader), 5))[0]


# -- the conformance cases over TLS ------------------------------------------------------------


@pytest.fixture
async def recorder():
    rec = Recorder()
    rec.port = await rec.start()
    yield rec
    rec.close()


@pytest.fixture
async def tls_front(recorder, ca, tmp_path, engine):
    """test_conformance's `front` (same settings, each engine), serving HTTPS."""
    files, _ = write_pair(ca, tmp_path)
    server, proxy, port = await start_gateway(
        [f"http://127.0.0.1:{recorder.port}"], ranges(("192.0.2.0", "192.0.2.255")), ssl=server_context(files),
        engine=engine,
        trusted_proxies=("127.0.0.1/32",), max_body_bytes=1000, max_header_bytes=1024)
    yield port, proxy
    server.close()
    await proxy.drain(0.1)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_case_over_tls(case: Case, tls_front, recorder, ca, engine) -> None:
    port, proxy = tls_front
    case = case.on(engine)
    recorder.reply = case.reply
    answer, closed = await send(port, case.send, len(case.answer), case.closes, ssl=client_context(ca))
    assert answer == case.answer
    assert closed == case.closes
    hostport = f"127.0.0.1:{recorder.port}".encode()
    assert recorder.requests == [r.replace(b"{up}", hostport) for r in case.upstream]
    assert proxy.buffered == 0


async def test_a_blacklisted_peer_over_tls_gets_the_reject_status(ca, tmp_path, engine):
    """The client address under a TLS transport is still the TCP peer (no XFF, no trusted proxy)."""
    bidder = await start_bidder()
    files, _ = write_pair(ca, tmp_path)
    server, proxy, port = await start_gateway([bidder.url], ranges(("127.0.0.2", "127.0.0.2")),
                                              ssl=server_context(files), engine=engine)
    try:
        blocked = await connect(port, client_context(ca), local="127.0.0.2")
        allowed = await connect(port, client_context(ca), local="127.0.0.3")
        assert await ask(*blocked) == 403
        assert await ask(*allowed) == 200
        assert [s.path for s in bidder.seen] == ["/bid"]  # the blocked request never went upstream
        assert dict(bidder.seen[0].raw_headers)[b"X-Forwarded-For"] == b"127.0.0.3"  # the peer, as seen over TLS
        for _, writer in (blocked, allowed):
            writer.close()
    finally:
        server.close()
        await proxy.drain(0.1)
        await bidder.runner.cleanup()


async def test_tls_is_1_2_or_newer_and_alpn_is_http_1_1(ca, tmp_path, engine):
    bidder = await start_bidder()
    files, _ = write_pair(ca, tmp_path)
    context = server_context(files)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    server, proxy, port = await start_gateway([bidder.url], ssl=context, engine=engine)
    try:
        client = client_context(ca)
        client.set_alpn_protocols(["h2", "http/1.1"])
        reader, writer = await connect(port, client)
        tls = writer.get_extra_info("ssl_object")
        assert tls.selected_alpn_protocol() == "http/1.1"  # never h2: the engine speaks HTTP/1.1 only
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert await ask(reader, writer) == 200
        writer.close()
    finally:
        server.close()
        await proxy.drain(0.1)
        await bidder.runner.cleanup()


def memory_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> bytes:
    """A TLS handshake between two contexts in memory (no socket); the certificate the client saw."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s_end = server.wrap_bio(bios[0], bios[1], server_side=True)
    c_end = client.wrap_bio(bios[2], bios[3], server_hostname="127.0.0.1")
    for _ in range(10):
        for end, outgoing, incoming in ((c_end, bios[3], bios[0]), (s_end, bios[1], bios[2])):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
            incoming.write(outgoing.read())
        try:
            return c_end.getpeercert(binary_form=True)
        except ValueError:  # handshake not done yet
            continue
    raise AssertionError("handshake never completed")


def test_a_half_rotated_pair_on_reload_keeps_the_live_context_untouched(ca, tmp_path, caplog):
    """A new certificate beside the old key (the key file not copied yet): loaded into the live
    context, it would leave it with the new certificate and no key, and every handshake would
    fail. It is refused before the live context is touched: one ERROR naming the file, never
    the key, and the old pair keeps serving."""
    files, first = write_pair(ca, tmp_path, "first")
    tls = Reloadable(files, "proxy")
    new = ca.issue_cert("127.0.0.1", common_name="second")
    Path(files.cert).write_bytes(b"".join(p.bytes() for p in new.cert_chain_pems))  # the key stays the old one
    assert tls.reload() is False
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and files.cert in errors[0].getMessage()
    assert "PRIVATE KEY" not in caplog.text
    assert memory_handshake(tls.context, client_context(ca)) == first


# -- a real `gateway serve`: reload on SIGHUP ---------------------------------------------------


def serve_args(broker, upstream: str, port: int, admin: int, *extra: str) -> list[str]:
    return ["serve", "--kafka", broker.bootstrap, "--upstream", upstream, "--listen", f"127.0.0.1:{port}",
            "--admin-listen", f"127.0.0.1:{admin}", *extra]


async def handshake_sees(port: int, context: ssl.SSLContext, der: bytes) -> bool:
    reader, writer = await connect(port, context)
    try:
        return peer_der(writer) == der and await ask(reader, writer) == 200
    finally:
        writer.close()


async def test_sighup_rotates_the_proxy_certificate_without_dropping_connections(own_broker, ca, tmp_path):
    bidder = await start_bidder()
    port, admin = free_port(), free_port()
    files, first = write_pair(ca, tmp_path, "first")
    client = client_context(ca)
    log = tmp_path / "gateway.log"
    try:
        with gateway_process(serve_args(own_broker, bidder.url, port, admin, "--tls-cert", files.cert,
                                        "--tls-key", files.key), log) as proc:
            await eventually(lambda: handshake_sees(port, client, first), timeout=60, what="HTTPS with the first cert")
            kept = await connect(port, client)  # a keep-alive connection opened before the rotation
            assert await ask(*kept) == 200

            _, second = write_pair(ca, tmp_path, "second")
            os.kill(proc.pid, signal.SIGHUP)
            await eventually(lambda: handshake_sees(port, client, second), timeout=20, what="the new certificate")
            assert peer_der(kept[1]) == first
            assert await ask(*kept) == 200  # the connection opened before goes on

            Path(files.cert).write_text("not a certificate\n")
            os.kill(proc.pid, signal.SIGHUP)
            await eventually(lambda: "TLS reload failed" in log.read_text(), timeout=20, what="the reload error")
            assert await handshake_sees(port, client, second)  # the last good certificate still serves
            assert await ask(*kept) == 200
            assert proc.poll() is None
            kept[1].close()

            # A worker forked after the bad rotation inherits the supervisor's last good pair; it
            # does not read the broken files left on disk (and so it serves at once).
            (worker,) = workers(proc.pid)
            os.kill(worker, signal.SIGKILL)
            await eventually(lambda: workers(proc.pid), until=lambda pids: len(pids) == 1 and worker not in pids,
                             timeout=20, what="the worker forked again")
            await eventually(lambda: handshake_sees(port, client, second), timeout=20,
                             what="the re-forked worker serving the last good certificate")
    finally:
        await bidder.runner.cleanup()


def workers(pid: int) -> list[int]:
    """The supervisor's child processes."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def admin_status(port: int, context: ssl.SSLContext) -> int | str:
    """GET /readyz over TLS: the status, or why there was none."""
    try:
        reader, writer = await connect(port, context)
        try:
            return await ask(reader, writer, b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        finally:
            writer.close()
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as exc:
        return f"refused: {exc!r}"


async def test_admin_over_tls_with_a_client_ca_refuses_a_client_without_a_certificate(own_broker, ca, tmp_path):
    bidder = await start_bidder()
    port, admin = free_port(), free_port()
    files, first = write_pair(ca, tmp_path, "admin", stem="admin")
    clients = trustme.CA()
    (tmp_path / "clients.pem").write_bytes(clients.cert_pem.bytes())
    with_cert = client_context(ca, clients.issue_cert("operator@example"))
    foreign = client_context(ca, trustme.CA().issue_cert("stranger@example"))

    async def admin_cert() -> bytes:
        _, writer = await connect(admin, with_cert)
        writer.close()
        return peer_der(writer)

    try:
        with gateway_process(serve_args(own_broker, bidder.url, port, admin, "--admin-tls-cert", files.cert,
                                        "--admin-tls-key", files.key, "--admin-tls-client-ca",
                                        str(tmp_path / "clients.pem")), tmp_path / "gateway.log") as proc:
            await eventually(lambda: admin_status(admin, with_cert), until=lambda s: s == 200, timeout=60,
                             what="admin over TLS with a client certificate")
            assert await admin_cert() == first
            assert str(await admin_status(admin, client_context(ca))).startswith("refused")
            assert str(await admin_status(admin, foreign)).startswith("refused")

            _, second = write_pair(ca, tmp_path, "admin-2", stem="admin")
            os.kill(proc.pid, signal.SIGHUP)  # the supervisor reloads the admin listener's pair itself
            await eventually(admin_cert, until=lambda der: der == second, timeout=20, what="the new admin cert")
            assert await admin_status(admin, with_cert) == 200
            assert str(await admin_status(admin, client_context(ca))).startswith("refused")
    finally:
        await bidder.runner.cleanup()


# -- refused at startup ------------------------------------------------------------------------


@pytest.mark.parametrize("bad, says", [
    ("proxy-protocol", "--proxy-protocol cannot be combined with --tls-cert"),
    ("missing key", "cannot load TLS certificate"),
    ("not PEM", "not a PEM file"),
    ("files from the environment, proxy-protocol", "--proxy-protocol cannot be combined with --tls-cert"),
])
def test_serve_refuses_tls_it_cannot_do_with_one_line(ca, tmp_path, bad, says):
    files, _ = write_pair(ca, tmp_path)
    key = "/nonexistent.key" if bad == "missing key" else files.key
    if bad == "not PEM":
        Path(files.cert).write_text("not a certificate\n")
    tls = ["--tls-cert", files.cert, "--tls-key", key]
    env = dict(os.environ)
    if bad.startswith("files from the environment"):
        env.update(GATEWAY_SERVE_TLS_CERT=files.cert, GATEWAY_SERVE_TLS_KEY=key)
        tls = []
    args = ["serve", "--kafka", "127.0.0.1:1", "--upstream", "http://127.0.0.1:1",
            "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
            *tls, *(["--proxy-protocol"] if "proxy-protocol" in bad else [])]
    done = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr


async def test_sighup_without_tls_kills_nothing(own_broker, tmp_path):
    """SIGHUP means "reload the certificates": without TLS neither the supervisor nor a worker dies of it."""
    bidder = await start_bidder()
    port, admin = free_port(), free_port()
    log = tmp_path / "gateway.log"

    async def answers() -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await ask(reader, writer) == 200
        finally:
            writer.close()

    try:
        with gateway_process(serve_args(own_broker, bidder.url, port, admin, "--workers", "2"), log) as proc:
            await eventually(answers, timeout=60, what="the gateway to serve")
            workers = [int(pid) for pid in re.findall(r"worker \d started pid=(\d+)", log.read_text())]
            assert len(workers) == 2
            for pid in workers:  # SIGHUP ignored or caught, never the default (terminate)
                assert handles_sighup(pid), f"worker {pid} would die of SIGHUP"
            os.kill(proc.pid, signal.SIGHUP)
            await eventually(lambda: "SIGHUP" in log.read_text(), timeout=20, what="the supervisor to take SIGHUP")
            assert await answers()
            assert proc.poll() is None
    finally:
        await bidder.runner.cleanup()


def handles_sighup(pid: int) -> bool:
    """Whether the process ignores or catches SIGHUP (from /proc: a mask, not a race)."""
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    bit = 1 << (signal.SIGHUP - 1)
    return bool((int(fields["SigIgn"], 16) | int(fields["SigCgt"], 16)) & bit)
