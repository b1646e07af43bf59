"""What a web browser may make this service do: the rule against other websites driving an open service.

WHY: without API keys the service trusts whoever reaches it, and a developer's browser reaches 127.0.0.1. Any web
page the developer visits can send it a "simple" request (a multipart upload, a text/plain predict: no preflight),
and after DNS rebinding (the page's own name re-resolved to 127.0.0.1) read the answers and delete models too. So,
while no keys are configured (keys are the real access control, and a key is never sent by a browser on its own):

- a state-changing request (POST, PUT, PATCH, DELETE) whose `Origin` names another origin than the request's own
  host (or, without an Origin, whose `Sec-Fetch-Site` is `cross-site`) is refused, unless ONNXFORGE_CORS_ORIGINS
  lists that origin. curl, tritonclient and the SDKs send no Origin: unaffected.
- a request that arrived on a loopback address must name a loopback host (localhost, *.localhost, 127.0.0.1,
  [::1], any port): a rebound name is refused. A request arriving on another address (behind a load balancer, in a
  container) is not checked: there the host names are the operator's.

`refusal` is a pure function of the request's headers so that both the ASGI stack (app/main.py) and the short HTTP
path (app/http_protocol.py, which has no scope) decide alike. `SECURITY_HEADERS` go on every answer.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from app.errors import ServiceError

# On every answer, API and dashboard: no MIME sniffing (a JSON error echoing a name is never run as HTML), no
# framing (clickjacking on the dashboard's pin buttons), no Referer carrying the dashboard's URL elsewhere.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
SECURITY_HEAD = b"".join(name + b": " + value + b"\r\n" for name, value in SECURITY_HEADERS)  # as written in a head

_CHANGING = frozenset(("POST", "PUT", "PATCH", "DELETE"))
_DEFAULT_PORTS = {"http": 80, "https": 443}


class CrossSiteRequestError(ServiceError):
    """A browser request that another website made (or a rebound host name): refused before anything runs."""

    status_code = 403


@dataclass(frozen=True)
class OriginGuard:
    """The rule for one app: `open` (no API keys: the rule applies) and the origins CORS allows."""

    open: bool
    allowed_origins: frozenset[str] = frozenset()

    def refusal(self, method: str, host: bytes | None, origin: bytes | None, fetch_site: bytes | None,
                server: tuple[str, int | None] | None) -> str | None:
        """Why the request is refused, or None. `host`, `origin`, `fetch_site`: the Host, Origin and
        Sec-Fetch-Site headers as sent (None when absent); `server`: the local address the connection arrived on
        (ASGI's scope["server"], uvicorn's protocol.server; None for a Unix socket)."""
        if not self.open:
            return None
        return self._refusal(method, host, origin, fetch_site, None if server is None else tuple(server))

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - guards live as long as their app
    def _refusal(self, method: str, host: bytes | None, origin: bytes | None, fetch_site: bytes | None,
                 server: tuple[str, int | None] | None) -> str | None:
        """`refusal` of an open service, remembered: WHY: the short HTTP path asks once per request, and a
        client's headers repeat (parsing an address each time cost microseconds of the event loop)."""
        host_text = host.decode("latin-1").strip().lower() if host is not None else None
        if host_text and server is not None and _is_loopback(server[0]) and not _is_loopback(_split_host(host_text)[0]):
            return (f"refused: Host {host_text!r} is not a name of this machine. Without API keys, a server reached "
                    "on a loopback address answers only localhost, 127.0.0.1 and [::1] (a guard against DNS "
                    "rebinding: any web page could otherwise name itself so and drive this service). To serve it "
                    "under another name, set API keys (ONNXFORGE_API_KEYS) or listen on a non-loopback address "
                    "(ONNXFORGE_HOST) behind your proxy")
        if method not in _CHANGING:
            return None
        if origin is not None:
            origin_text = origin.decode("latin-1").strip()
            if origin_text.rstrip("/").lower() in self.allowed_origins or "*" in self.allowed_origins:
                return None
            if host_text and _same_origin(origin_text, host_text):
                return None
            return (f"refused: a {method} from another website (Origin: {origin_text}) to this service, which has no "
                    "API keys. Browsers may change things here only from the service's own pages; to allow a web "
                    "app on that origin, list it in ONNXFORGE_CORS_ORIGINS (or set ONNXFORGE_API_KEYS)")
        if fetch_site is not None and fetch_site.strip().lower() == b"cross-site":
            return (f"refused: a cross-site {method} (Sec-Fetch-Site: cross-site) to this service, which has no API "
                    "keys. Browsers may change things here only from the service's own pages; to allow a web app "
                    "on another origin, list it in ONNXFORGE_CORS_ORIGINS (or set ONNXFORGE_API_KEYS)")
        return None


    def check(self, method: str, host: bytes | None, origin: bytes | None, fetch_site: bytes | None,
              server: tuple[str, int | None] | None) -> None:
        """Raise CrossSiteRequestError (403) with the `refusal`, if any."""
        refused = self.refusal(method, host, origin, fetch_site, server)
        if refused is not None:
            raise CrossSiteRequestError(refused)


def guard_of(open_: bool, cors_origins: list[str]) -> OriginGuard:
    """The guard of an app with no keys (`open_`) or some, and ONNXFORGE_CORS_ORIGINS (app.security.cors_origins)."""
    return OriginGuard(open_, frozenset(o.rstrip("/").lower() for o in cors_origins))


def _split_host(host: str) -> tuple[str, str]:
    """A Host header value's name or address and port ("" if none): `[::1]:8000` -> ("::1", "8000")."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest.removeprefix(":")
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, port
    return host, ""  # a name, or a bare IPv6 address (not valid in Host, compared whole)


def _is_loopback(name: str) -> bool:
    """A loopback address, `localhost` or a name under `.localhost` (browsers resolve those to loopback
    themselves, RFC 6761: no DNS answer can rebind them)."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _same_origin(origin: str, host: str) -> bool:
    """Whether `origin` (scheme://name[:port]) is the request's own `host` (name[:port]). The scheme is not
    compared (TLS may end at a proxy); a Host without a port matches the origin's name on any port, as proxies
    (nginx's `$host`) drop it."""
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return False  # "null" (a sandboxed frame, a file:// page) and anything else is another origin
    name, port = _split_host(host)
    return parts.hostname == name and (not port or (port.isdigit() and int(port) == origin_port))
