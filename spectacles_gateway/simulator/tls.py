"""A throwaway certificate so the simulator can serve ``https://`` and ``wss://``.

Made with the ``openssl`` command (no Python dependency): a self-signed P-256 certificate for
the simulator's host, valid two days, in a private temporary directory. Clients trust it by
loading the certificate itself as their CA file (``SSL_CERT_FILE`` for most of them).
"""

from __future__ import annotations

import ipaddress
import shutil
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificate:
    directory: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this certificate (and checks the host name)."""
        return ssl.create_default_context(cafile=str(self.cert_file))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _subject_alt_name(hosts: tuple[str, ...]) -> str:
    names = []
    for host in dict.fromkeys(("localhost", *hosts)):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            names.append(f"DNS:{host}")
        else:
            names.append(f"IP:{host}")
    return "subjectAltName=" + ",".join(names)


def self_signed(*hosts: str) -> Certificate:
    """A new certificate valid for ``hosts`` (and ``localhost``); RuntimeError without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("tls=True needs the openssl command to make a certificate")
    directory = Path(tempfile.mkdtemp(prefix="spectacles-sim-tls-"))
    cert = Certificate(directory, directory / "cert.pem", directory / "key.pem")
    argv = [
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "2", "-subj", "/CN=spectacles-simulator",
        "-addext", _subject_alt_name(hosts),
        "-keyout", str(cert.key_file), "-out", str(cert.cert_file),
    ]  # fmt: skip
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)  # noqa: S603
    except (OSError, subprocess.SubprocessError) as exc:
        cert.remove()
        raise RuntimeError(f"could not make a certificate with openssl: {exc}") from exc
    return cert
