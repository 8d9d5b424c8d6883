"""Is the Hugging Face hub reachable, and is a dataset in the local cache? (stdlib only)

Used by ``mpmoe data`` (hub tokenizers and datasets) and by :mod:`mpmoe.eval.hub` (task
datasets) to stop in seconds, naming what is missing, instead of in the minute the hub
clients spend on retries when the machine is offline.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from mpmoe.errors import UserError

__all__ = ["DEFAULT_ENDPOINT", "dataset_cached", "datasets_cache_dir", "enable_offline_mode",
           "hub_endpoint", "hub_unreachable", "offline_env", "url_reachable"]

#: the hub used when ``HF_ENDPOINT`` is not set
DEFAULT_ENDPOINT = "https://huggingface.co"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_env() -> str | None:
    """The name of the offline switch that is on (``HF_HUB_OFFLINE``, ...), or None."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return var
    return None


def hub_endpoint() -> str:
    """The hub URL datasets will use: ``HF_ENDPOINT`` or https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if not parts.hostname:
        raise UserError(f"cannot read a host from the URL {url!r} (check HF_ENDPOINT)")
    try:
        port = parts.port
    except ValueError:
        raise UserError(f"bad port in the URL {url!r} (check HF_ENDPOINT)") from None
    return parts.hostname, port or (80 if parts.scheme == "http" else 443)


def _describe_target(url: str) -> str:
    """``url (host:port)``, or ``url via proxy host:port`` when an environment proxy applies."""
    host, port = _host_port(url)
    scheme = urlsplit(url).scheme or "https"
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p_host, p_port = _host_port(proxy)
        return f"{url} via proxy {p_host}:{p_port}"
    return f"{url} ({host}:{port})"


def _ssl_context() -> ssl.SSLContext:
    """The system CAs (and ``SSL_CERT_FILE``), plus certifi's bundle and ``REQUESTS_CA_BUNDLE``
    / ``CURL_CA_BUNDLE`` when present: the CAs the hub client (httpx) may trust."""
    context = ssl.create_default_context()
    extra = [os.environ.get("REQUESTS_CA_BUNDLE"), os.environ.get("CURL_CA_BUNDLE")]
    try:
        import certifi

        extra.append(certifi.where())
    except ImportError:
        pass
    for bundle in extra:
        if bundle and os.path.isfile(bundle):
            try:
                context.load_verify_locations(cafile=bundle)
            except (OSError, ssl.SSLError):
                pass
    return context


def _why(err: BaseException, timeout: float) -> str:
    reason = getattr(err, "reason", None)
    if isinstance(err, urllib.error.URLError) and isinstance(reason, BaseException):
        err = reason
    if isinstance(err, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout:g}s"
    if isinstance(err, socket.gaierror):
        return f"host name not resolved: {err.strerror or err}"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {err.verify_message or err}"
    if isinstance(err, ssl.SSLError):
        return f"TLS failure: {err.reason or err}"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return f"{type(err).__name__}: {err}"


def _probe(url: str, timeout: float) -> str | None:
    """None if the server at ``url`` answers HTTP within ``timeout`` seconds, else why not.

    One ``HEAD`` request to the root of ``url``'s host, through the environment's proxies
    (``https_proxy``, ``no_proxy``, ...); any HTTP status counts as an answer. A bare TCP
    connection is not enough: sandboxes and firewalls often accept every connection and
    then fail the TLS handshake. The request runs in a daemon thread abandoned at the
    deadline, so a hanging name resolver or server costs ``timeout`` and no more.
    """
    parts = urlsplit(url)
    root = f"{parts.scheme}://{parts.netloc}/"
    result: list[str | None] = []

    def attempt() -> None:
        try:
            handlers = [urllib.request.HTTPSHandler(context=_ssl_context())] if parts.scheme == "https" else []
            opener = urllib.request.build_opener(*handlers)
            request = urllib.request.Request(root, method="HEAD", headers={"User-Agent": "mpmoe-eval-hub-check"})
            with opener.open(request, timeout=timeout):
                pass
            result.append(None)
        except urllib.error.HTTPError:  # the server answered, with an error status: reachable
            result.append(None)
        except Exception as err:  # noqa: BLE001 - every failure means "not reachable"
            result.append(_why(err, timeout))

    thread = threading.Thread(target=attempt, name="mpmoe-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.25)
    if not result:
        return f"no answer within {timeout:g}s"
    return result[0]


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the server of an ``http(s)`` ``url`` answers within ``timeout`` seconds.

    False without a request when an offline switch (:func:`offline_env`) is on; True for
    other schemes (``s3://``, ...), which cannot be probed this way.
    """
    if offline_env():
        return False
    if urlsplit(url).scheme not in ("http", "https"):
        return True
    return _probe(url, timeout) is None


def datasets_cache_dir() -> Path:
    """The ``datasets`` cache folder as a fresh process would read it from the environment."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_DATASETS_CACHE"]))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"]))) / "datasets"
    xdg = os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "~/.cache")
    return Path(xdg) / "huggingface" / "datasets"


def _snake(name: str) -> str:
    """``datasets``' CamelCase -> snake_case rule for cache folder names."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name)
    return name.lower()


def dataset_cached(path: str, name: str | None = None, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the ``datasets`` cache holds a prepared copy of hub dataset ``path`` / ``name``.

    Looks for ``<cache>/<ns>___<snake name>/<config>[-<hash>]/<version>/<hash>/dataset_info.json``
    (any config when ``name`` is None); file-system only, fast, no network.
    """
    root = Path(cache_dir) if cache_dir is not None else datasets_cache_dir()
    parts = path.strip("/").split("/")
    parts[-1] = _snake(parts[-1])
    base = root / "___".join(parts)
    if not base.is_dir():
        return False
    for info in base.glob("*/*/*/dataset_info.json"):
        config = info.parent.parent.parent.name
        if name is None or config == name or config.startswith(f"{name}-"):
            return True
    return False


def enable_offline_mode() -> None:
    """Make ``datasets`` / ``huggingface_hub`` use only local files from now on.

    Sets ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` in ``os.environ`` (for modules
    imported later and child processes) and, for modules already imported, the flags they
    copied at import: ``huggingface_hub.constants.HF_HUB_OFFLINE`` and
    ``datasets.config.HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``. A module that copied the
    flag into its own namespace at import keeps its old value.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True
        config.HF_DATASETS_OFFLINE = True


def hub_unreachable() -> str | None:
    """None if the Hugging Face hub can be asked for something not cached; else why not (an
    offline switch is on, or the hub does not answer within 3 s): fail in seconds instead of
    in the minute the hub clients spend on retries."""
    switch = offline_env()
    if switch:
        return f"not in the local Hugging Face cache and {switch} is set"
    if not url_reachable(hub_endpoint(), timeout=3.0):
        return f"not in the local Hugging Face cache and the hub ({hub_endpoint()}) cannot be reached"
    return None
