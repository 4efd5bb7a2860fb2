"""A Hub mirror's private CA, trusted beside the public ones.

The operator mounts a mirror's CA bundle (model.hf.caBundle) and names it in FLEETLM_EXTRA_CA_FILE. Were
it made SSL_CERT_FILE itself, it would be the only CA trusted, and a mirror that redirects its large
files to a store with a public certificate (an artifact store's S3, a CDN) would fail there. So the
process trusts a bundle of both: the public roots it trusts already (SSL_CERT_FILE, else certifi's) and
the mirror's, written under the temp directory (the one writable place of a read-only root filesystem).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

EXTRA_CA_ENV = "FLEETLM_EXTRA_CA_FILE"


def trust_extra_ca(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Point SSL_CERT_FILE (httpx) and REQUESTS_CA_BUNDLE (requests) at the public roots plus
    FLEETLM_EXTRA_CA_FILE's certificates; the bundle written, or None where no extra CA is named.
    Raises ValueError when the file cannot be read or holds no PEM certificate."""
    extra = environ.get(EXTRA_CA_ENV)
    if not extra:
        return None
    try:
        added = Path(extra).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{EXTRA_CA_ENV}={extra}: cannot read it ({exc})") from exc
    if "-----BEGIN CERTIFICATE-----" not in added:
        raise ValueError(f"{EXTRA_CA_ENV}={extra}: holds no PEM certificate")
    base = environ.get("SSL_CERT_FILE")
    if not base:
        import certifi

        base = certifi.where()
    bundle = Path(tempfile.gettempdir()) / f"fleetlm-ca-bundle-{os.getpid()}.pem"
    bundle.write_text(Path(base).read_text().rstrip("\n") + "\n" + added)
    environ["SSL_CERT_FILE"] = environ["REQUESTS_CA_BUNDLE"] = str(bundle)
    return bundle
