"""TLS for the remote listener: the operator's certificate, or one generated on first start.

A backend reachable beyond loopback speaks HTTPS only. Without `--tls-cert/--tls-key` it makes a
self-signed certificate once, keeps it in its own data folder (DATA/tls/, key 0600) and reuses it
on every start, so the SHA-256 fingerprint the artists pinned stays valid. The add-on trusts a
backend by that fingerprint, not by a certificate authority, so the names in the certificate only
matter for other clients (curl, browsers); they list the bound address, this machine's names and
any `--public-name`.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from make_your_3d.errors import BadRequest, DataUnwritable
from make_your_3d.files import atomic_write_bytes

TLS_DIR = "tls"
CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"


@dataclass(frozen=True)
class TlsConfig:
    """How a generated certificate is made."""

    # Ten years: a pinned fingerprint must not break under artists after a year; the key never
    # leaves the backend's own folder and a new one (a new fingerprint) is one deleted folder away.
    validity_days: int = 3650
    # Certificates are back-dated this much so a client whose clock is a little behind accepts them.
    backdate_s: int = 300
    common_name: str = "Make-Your-3D backend"
    extra_names: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    fingerprint: str  # SHA-256 of the DER certificate, colon-separated upper-case hex
    generated: bool  # made by this start (False: found in DATA/tls or given by the operator)


def format_fingerprint(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)


def normalise_fingerprint(text: str) -> str:
    """`AB:CD:...`, `abcd...` or `sha256/AB CD ...` -> 64 lower-case hex digits ('' when it is not one)."""
    hexdigits = "".join(ch for ch in text.lower().removeprefix("sha256").strip("/= ") if ch in "0123456789abcdef")
    return hexdigits if len(hexdigits) == 64 else ""


def fingerprint_of_der(der: bytes) -> str:
    return format_fingerprint(hashlib.sha256(der).digest())


def fingerprint_of_pem_file(path: Path) -> str:
    """The fingerprint of the first certificate in a PEM file (the leaf the server presents)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise BadRequest(f"The TLS certificate {path} is not a readable PEM certificate ({exc}). Pass the right file to --tls-cert.") from None
    return fingerprint_of_der(certs[0].public_bytes(Encoding.DER))


def machine_names(host: str) -> list[str]:
    """Names and addresses a client may use for this backend: the bound address (unless a wildcard),
    this machine's host names, and loopback."""
    names = ["localhost", "127.0.0.1", "::1"]
    bare = host.strip("[]")
    if bare not in ("", "0.0.0.0", "::"):
        names.append(bare)
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names:
            names.append(name)
    return names


def generate_self_signed(cert_path: Path, key_path: Path, names: list[str], config: TlsConfig = TlsConfig()) -> None:
    """Write a new EC P-256 key and a self-signed certificate for `names` (DNS names and IPs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in dict.fromkeys([*names, *config.extra_names]):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, config.common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(seconds=config.backdate_s))
        .not_valid_after(now + datetime.timedelta(days=config.validity_days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write_bytes(key_path, key_pem, 0o600)  # the key first: a certificate never exists without its key
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _usable_pair(cert: Path, key: Path) -> bool:
    """Whether the pair loads together and the certificate has not expired."""
    from cryptography import x509

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except (OSError, ValueError, ssl.SSLError):
        return False
    return leaf.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc)


def ensure_tls(data_dir: Path, host: str, cert: Path | None = None, key: Path | None = None,
               config: TlsConfig = TlsConfig()) -> TlsFiles:
    """The certificate and key the remote listener serves: the operator's (checked: both given, they
    load together), else DATA/tls/ (generated when missing, damaged or expired)."""
    if (cert is None) != (key is None):
        raise BadRequest("Give both --tls-cert and --tls-key, or neither (a certificate is then generated in the data folder).")
    if cert is not None and key is not None:
        for path, flag in ((cert, "--tls-cert"), (key, "--tls-key")):
            if not Path(path).is_file():
                raise BadRequest(f"The file {path} given to {flag} does not exist.")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as exc:
            raise BadRequest(f"The certificate {cert} and key {key} do not load together ({exc}). Check that the key belongs to "
                             "the certificate and is not password-protected.") from None
        return TlsFiles(Path(cert), Path(key), fingerprint_of_pem_file(cert), generated=False)
    folder = Path(data_dir) / TLS_DIR
    cert_path, key_path = folder / CERT_NAME, folder / KEY_NAME
    generated = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.name != "nt":
            folder.chmod(0o700)
        if not _usable_pair(cert_path, key_path):
            generate_self_signed(cert_path, key_path, machine_names(host), config)
            generated = True
    except OSError as exc:
        raise DataUnwritable(f"Cannot write the TLS certificate into {folder} ({exc.strerror or exc}). Make the data folder "
                             "writable by you, or pass --tls-cert and --tls-key.") from None
    return TlsFiles(cert_path, key_path, fingerprint_of_pem_file(cert_path), generated)
