"""NATS between machines over TLS with verified certificates on both sides: a 3-node cluster whose client and
route connections require TLS and a client certificate from our CA; the api and a worker connect through the
settings (INFERQ_NATS_TLS_CA_FILE, _CERT_FILE, _KEY_FILE) and serve a request; a client without a
certificate, with one from another CA, or without TLS at all is refused."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import pytest

from broker.connection import NatsAuth
from common.settings import Settings
from tests.integration.harness import ApiServer, WorkerProcess, wait_healthy
from tests.integration.nats_cluster import NatsCluster
from tests.integration.tls_certs import CertFiles, CertificateAuthority

pytestmark = pytest.mark.slow

MODEL = "sim-tls"


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    client: CertFiles
    rogue_client: CertFiles  # signed by a CA the servers do not trust


def _tls_block(ca: Path, server: CertFiles, indent: str = "") -> str:
    return (
        f"{indent}tls {{\n"
        f"{indent}  cert_file: {json.dumps(str(server.cert))}\n"
        f"{indent}  key_file: {json.dumps(str(server.key))}\n"
        f"{indent}  ca_file: {json.dumps(str(ca))}\n"
        f"{indent}  verify: true\n"  # a client must present a certificate our CA signed
        f"{indent}  timeout: 2\n"
        f"{indent}}}\n"
    )


@pytest.fixture(scope="module")
async def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[NatsCluster, Pki]]:
    root = tmp_path_factory.mktemp("nats-tls")
    ca = CertificateAuthority(root / "pki", "inferq-test")
    server = ca.issue("nats-server", server=True)
    pki = Pki(
        ca,
        ca.issue("inferq-client", server=False),
        CertificateAuthority(root / "rogue", "rogue").issue("rogue-client", server=False),
    )
    cluster = NatsCluster(
        root / "cluster",
        size=3,
        extra_config=_tls_block(ca.cert_file, server),
        route_config=_tls_block(ca.cert_file, server, indent="  "),
    )
    with cluster:
        client = NatsAuth(tls_ca_file=ca.cert_file, tls_cert_file=pki.client.cert, tls_key_file=pki.client.key)
        await cluster.wait_for_jetstream(timeout_s=60, tls=client.tls_context())
        yield cluster, pki


def _settings(cluster: NatsCluster, pki: Pki, data_dir: Path) -> Settings:
    return Settings(
        nats_url=cluster.urls,
        nats_replicas=3,
        nats_tls_ca_file=pki.ca.cert_file,
        nats_tls_cert_file=pki.client.cert,
        nats_tls_key_file=pki.client.key,
        engine="sim",
        served_model_name=MODEL,
        sim_tokens_per_s=200.0,
        max_num_seqs=4,
        log_format="json",
        data_dir=data_dir,
    )


async def test_api_and_worker_serve_over_verified_tls(tls_cluster, tmp_path: Path) -> None:
    cluster, pki = tls_cluster
    settings = _settings(cluster, pki, tmp_path / "data")
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    api = ApiServer(settings).start(timeout=60)
    try:
        await wait_healthy(api.base_url, worker, timeout=90)
        async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
            reply = await http.post(
                "/v1/completions", json={"model": MODEL, "prompt": "w1 w2", "max_tokens": 5, "ignore_eos": True}
            )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 5
        # Every client connection on every node is TLS (the monitoring endpoint says so per connection). The
        # clients pick a node at random from the URL list, so look at all of them.
        connections = [
            conn
            for node in cluster.nodes
            for conn in httpx.get(f"http://127.0.0.1:{node.http_port}/connz", timeout=5).json()["connections"] or []
        ]
        assert connections and all(conn.get("tls_version") for conn in connections)
    finally:
        api.stop()
        worker.stop()


async def _refused(cluster: NatsCluster, **options) -> BaseException:
    """The error a one-shot connection attempt ends with (it must not succeed)."""
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                cluster.nodes[0].url, allow_reconnect=False, connect_timeout=3, max_reconnect_attempts=0, **options
            ),
            timeout=15,
        )
    except Exception as exc:
        return exc
    try:  # a TLS server can accept the handshake and drop us right after: the first round trip tells
        await nc.flush(timeout=3)
        await nc.jetstream().account_info()
    except Exception as exc:
        return exc
    finally:
        await nc.close()
    raise AssertionError("the connection was accepted")


def _handshake_errors(cluster: NatsCluster) -> list[str]:
    return [line for line in cluster.nodes[0].log().splitlines() if "TLS handshake error" in line]


async def test_the_probe_accepts_a_valid_client(tls_cluster) -> None:
    cluster, pki = tls_cluster
    valid = NatsAuth(tls_ca_file=pki.ca.cert_file, tls_cert_file=pki.client.cert, tls_key_file=pki.client.key)
    with pytest.raises(AssertionError, match="accepted"):
        await _refused(cluster, tls=valid.tls_context())


async def test_a_client_without_a_certificate_is_refused(tls_cluster) -> None:
    cluster, pki = tls_cluster
    no_cert = NatsAuth(tls_ca_file=pki.ca.cert_file).tls_context()
    assert no_cert is not None and no_cert.verify_mode == ssl.CERT_REQUIRED
    before = len(_handshake_errors(cluster))
    error = await _refused(cluster, tls=no_cert)
    assert isinstance(error, ConnectionError | ssl.SSLError | nats.errors.Error), repr(error)
    assert len(_handshake_errors(cluster)) > before  # the server ended the handshake


async def test_a_client_with_a_certificate_from_another_ca_is_refused(tls_cluster) -> None:
    cluster, pki = tls_cluster
    rogue = NatsAuth(
        tls_ca_file=pki.ca.cert_file, tls_cert_file=pki.rogue_client.cert, tls_key_file=pki.rogue_client.key
    )
    error = await _refused(cluster, tls=rogue.tls_context())
    assert isinstance(error, ConnectionError | ssl.SSLError | nats.errors.Error), repr(error)
    assert any("unknown authority" in line and "rogue-client" in line for line in _handshake_errors(cluster))


async def test_a_plaintext_client_is_refused(tls_cluster) -> None:
    """nats-py would upgrade to TLS by itself; a raw socket speaks the protocol in plain text."""
    cluster, _ = tls_cluster
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.nodes[0].client_port)
    try:
        info = json.loads((await asyncio.wait_for(reader.readline(), 5)).decode().removeprefix("INFO "))
        assert info["tls_required"] is True
        writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 10)  # the server hangs up (b"") instead of PONG
        assert b"PONG" not in answer
    finally:
        writer.close()


async def test_a_client_not_trusting_the_servers_ca_refuses_the_server(tls_cluster, tmp_path: Path) -> None:
    cluster, pki = tls_cluster
    other_ca = CertificateAuthority(tmp_path / "other", "other")
    mismatched = NatsAuth(tls_ca_file=other_ca.cert_file, tls_cert_file=pki.client.cert, tls_key_file=pki.client.key)
    error = await _refused(cluster, tls=mismatched.tls_context())
    assert isinstance(error, ssl.SSLCertVerificationError), repr(error)
