"""wss://: the agent verifies the server's certificate; ca-bundle adds a trusted CA.

The server listens with a Twisted `ssl:` endpoint (the `addr` form the README shows)
using a certificate from a throwaway CA made here.
"""
from __future__ import annotations

import datetime
import ipaddress
import random

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor

from taskd.agent.connection import ServerConnection
from tests.integration.harness import ADMIN_KEY, start_server, stop_server
from tests.waiting import until


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(tmp_path, dns_name: str = "localhost"):
    """A CA and a server certificate for ``dns_name`` / 127.0.0.1, as PEM files."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("taskd test CA")).issuer_name(_name("taskd test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(dns_name)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(dns_name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"


async def _tls_server(sqlite_only, tmp_path, dns_name: str = "localhost"):
    ca, cert, key = make_pki(tmp_path, dns_name)
    running = await start_server(*sqlite_only, addr=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    return running, ca


def _connection(port: int, frames: list, host: str = "localhost", **kw) -> ServerConnection:
    return ServerConnection(url=f"wss://{host}:{port}/api/v1/socket/tls-agent/1", api_key=ADMIN_KEY,
                            reactor=reactor, on_frame=frames.append, rng=random.Random(1), max_backoff=0.3, **kw)


async def _connects(running, **kw) -> None:
    """The agent gets its taskList over wss:// (the certificate was accepted)."""
    frames: list = []
    conn = _connection(running.port, frames, **kw)
    conn.startService()
    try:
        await until(lambda: any(f.event == "taskList" for f in frames), what="taskList over wss")
    finally:
        await conn.stopService()
        await stop_server(running)


async def _refused(running, **kw) -> None:
    """The agent keeps failing to connect and the server never sees a session."""
    frames: list = []
    conn = _connection(running.port, frames, **kw)
    conn.startService()
    try:
        await until(lambda: conn.attempts >= 2, what="failed attempts")
        assert not conn.connected and frames == []
        assert running.server.sessions.sessions == {}
    finally:
        await conn.stopService()
        await stop_server(running)


@pytest_twisted.ensureDeferred
async def test_wss_with_the_ca_bundle_connects(sqlite_only, tmp_path):
    running, ca = await _tls_server(sqlite_only, tmp_path)
    await _connects(running, ca_bundle=str(ca))


@pytest_twisted.ensureDeferred
async def test_wss_refuses_a_certificate_nobody_vouches_for(sqlite_only, tmp_path):
    running, _ = await _tls_server(sqlite_only, tmp_path)
    await _refused(running)  # system CAs only


@pytest_twisted.ensureDeferred
async def test_wss_with_the_ca_bundle_connects_by_ip_address(sqlite_only, tmp_path):
    running, ca = await _tls_server(sqlite_only, tmp_path)
    await _connects(running, host="127.0.0.1", ca_bundle=str(ca))  # the certificate's IP SAN


@pytest_twisted.ensureDeferred
async def test_wss_with_the_ca_bundle_still_checks_the_host_name(sqlite_only, tmp_path):
    running, ca = await _tls_server(sqlite_only, tmp_path, dns_name="other.example")
    await _refused(running, ca_bundle=str(ca))  # a trusted CA, the wrong name
