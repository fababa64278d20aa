"""The server's TLS context: X.509 certificate and key, optionally a CA for client certificates."""

import ssl

from ..errors import ConfigError


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """TLS 1.2 or later with ``cert``/``key``; with ``ca`` every client must present a
    certificate that ``ca`` signed (ConfigError for unreadable or mismatched files)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # the spec's MUST
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise ConfigError(f"cannot read the TLS certificate or key: {e.filename}") from None
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot load the TLS certificate {cert} with key {key}: {e}") from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except FileNotFoundError:
            raise ConfigError(f"cannot read the TLS CA certificate {ca}") from None
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"cannot load the TLS CA certificate {ca}: {e}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
