"""TLS on the EPP's ext_proc port, as GIE's EPP serves it: the certificate in `--cert-path DIR`
(`tls.crt`, `tls.key`, e.g. a mounted cert-manager Secret) or, without one, a self-signed
certificate made at start (an EC P-256 key; the names it is valid for are its subject
alternative names, so a client that trusts the certificate itself can verify the server)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


def write_self_signed(directory: Path, hosts: list[str] = ()) -> Path:
    """A self-signed certificate and its key in `directory`, valid for localhost, 127.0.0.1,
    this machine's name and `hosts` (names or IPs) for ten years; returns the certificate's path."""
    key = ec.generate_private_key(ec.SECP256R1())
    names = {"localhost", socket.gethostname(), *[h for h in hosts if h and h not in ("0.0.0.0", "::")]}
    alt: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for name in sorted(names):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "disagg-epp")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / KEY_FILE
    with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path = directory / CERT_FILE
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def server_context(cert_dir: Path) -> ssl.SSLContext:
    """A server context for HTTP/2 (ALPN h2) with the certificate and key in `cert_dir`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_dir / CERT_FILE, cert_dir / KEY_FILE)
    context.set_alpn_protocols(["h2"])
    return context
