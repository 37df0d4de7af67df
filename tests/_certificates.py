"""Test certificates made with the openssl command: a CA, a server certificate it signed
for localhost and 127.0.0.1, a client certificate it signed, and one of another CA."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest


@attrs.frozen
class Certificates:
    """PEM files of a test CA, a server certificate it signed for localhost and
    127.0.0.1, a client certificate it signed, and a client certificate of another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def make_certificates(directory: Path) -> Certificates:
    """Made with the openssl command (Debian's openssl package), EC P-256 keys."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: `bash .ci/run` installs it "
                    "(or: apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
            "-subj", f"/CN=rex test {ca}")
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ca, extra in (("server", "ca", ["-extfile", "server.ext"]),
                            ("client", "ca", []), ("rogue", "rogue-ca", [])):
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=rex test {name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *extra)
    return Certificates(
        ca=directory / "ca.pem", server_cert=directory / "server.pem",
        server_key=directory / "server.key", client_cert=directory / "client.pem",
        client_key=directory / "client.key", rogue_cert=directory / "rogue.pem",
        rogue_key=directory / "rogue.key")
