"""What keeps the web viewer from opening the server's disk to whoever reaches it. Pure Python (no trame).

* :class:`DataRoot`: paths typed in the page are resolved (``..`` and symlinks) and must lie under one of the
  data-root folders.
* :class:`UploadFolder`: uploads have a size limit and go to a private temporary folder (mode 0700), deleted at
  exit.
* :func:`new_token` and :func:`token_middleware`: every HTTP and websocket request needs the access token
  (``?token=...`` once, then a cookie), as Jupyter does; without it the answer is 403. On the loopback address too:
  there, without a token, any program of any user of the machine, and any web page open in the user's browser,
  could open the page's websocket and read and drive the session (its volumes' paths, landmarks and matches). The
  cookie is ``SameSite=Strict``, so another site's page does not send it, and its name is the port's own, so
  servers on several ports of one host keep theirs.

>>> root = DataRoot(["/tmp"])
>>> root.resolve("/tmp/../etc/passwd")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
samembed.errors.InputError: /tmp/../etc/passwd: outside the data folders this server may read (/tmp); ...
"""

from __future__ import annotations

import atexit
import hmac
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from samembed import InputError

#: the start of the access cookie's name (:func:`token_cookie`)
TOKEN_COOKIE = "samembed_token"


def token_cookie(host: str) -> str:
    """The name of the access cookie for the server the browser reaches at ``host`` (the request's ``Host``,
    ``name:port``): one per port, since cookies are per host, not per port; a server started again on the same
    port replaces its predecessor's, so they do not pile up."""
    port = host.rsplit(":", 1)[1] if ":" in host and not host.endswith("]") else "default"
    return f"{TOKEN_COOKIE}_{re.sub(r'[^0-9A-Za-z]', '_', port)}"


def same_origin(origin: str | None, hosts: Iterable[str]) -> bool:
    """Whether a request's ``Origin`` header names a server it reached: one of ``hosts`` (``name:port``: its
    ``Host`` header, and a reverse proxy's ``X-Forwarded-Host``). No ``Origin``: a request no page made (a script,
    the address bar), which the token alone guards."""
    if not origin:
        return True
    from urllib.parse import urlsplit

    def place(url: str, default: int) -> tuple[str, int] | None:
        parts = urlsplit(url)
        try:
            return (parts.hostname or "").lower(), parts.port or default
        except ValueError:  # a port that is no number
            return None

    parts = urlsplit(origin)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    if default is None:
        return False
    mine = place(origin, default)
    return mine is not None and any(place("//" + h.strip(), default) == mine for h in hosts if h and h.strip())


def new_token() -> str:
    """A random access token (32 bytes of entropy, URL-safe)."""
    return secrets.token_urlsafe(32)


class DataRoot:
    """The folders whose files the page may open by path.

    Args:
        folders: the allowed folders; each is resolved (symlinks followed) once here.
    """

    def __init__(self, folders: Iterable[str | os.PathLike]) -> None:
        self.folders = [Path(f).expanduser().resolve() for f in folders]

    def resolve(self, text: str | os.PathLike) -> Path:
        """The real path of ``text`` (relative paths are taken from the first data folder) when it lies under a
        data folder.

        Raises:
            samembed.InputError: the path leaves the data folders (after resolving ``..`` and symlinks), or no
                data folder was given.
        """
        if not self.folders:
            raise InputError("this server reads no folder by path (start it with --data-root DIR); upload files instead")
        raw = Path(str(text).strip()).expanduser()
        candidate = raw if raw.is_absolute() else self.folders[0] / raw
        real = candidate.resolve()  # follows every symlink and removes '..'
        if not any(real == folder or folder in real.parents for folder in self.folders):
            allowed = ", ".join(str(f) for f in self.folders)
            raise InputError(f"{text}: outside the data folders this server may read ({allowed}); "
                             "choose a file under them or upload it")
        if not real.exists():
            raise InputError(f"{text}: no such file or folder")
        return real


class UploadFolder:
    """A private temporary folder for uploaded files, with a size limit, removed at exit.

    Args:
        max_bytes: the largest upload accepted, bytes.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.path = Path(tempfile.mkdtemp(prefix="samembed-web-"))  # mode 0700: other users cannot read it
        atexit.register(self.cleanup)

    def check_size(self, name: str, size: int) -> None:
        """Raise ``InputError`` when ``size`` bytes exceed the limit (before anything is written)."""
        if size > self.max_bytes:
            raise InputError(f"{name}: {size / 1e6:.1f} MB is larger than this server's upload limit of "
                             f"{self.max_bytes / 1e6:.1f} MB (--max-upload-mb)")

    def save(self, name: str, content: bytes) -> Path:
        """Write one uploaded file (its name stripped of folders and odd characters); returns its path."""
        self.check_size(name, len(content))
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name)).name).lstrip(".") or "upload"
        folder = Path(tempfile.mkdtemp(dir=self.path))  # one folder per upload: equal names do not collide
        path = folder / safe
        path.write_bytes(content)
        return path

    def discard(self, saved: Path) -> None:
        """Remove one upload (a path :meth:`save` returned), e.g. a file the page could not load."""
        folder = Path(saved).parent
        if folder.parent == self.path:
            shutil.rmtree(folder, ignore_errors=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def limit_websocket_messages(max_bytes: int) -> None:
    """Refuse any websocket message larger than ``max_bytes`` when its first chunk arrives, before memory is set
    aside for it. wslink lets an authenticated client declare messages of up to 4 GB, and sets aside the whole
    declared size at the first chunk, so the upload limit, checked once a file had arrived, came after the memory
    was taken. This caps wslink's limit (its ``UnChunker``, for every connection of this process) at ``max_bytes``;
    the page itself refuses a file over the upload limit before sending it."""
    from wslink.chunking import UnChunker

    if getattr(UnChunker, "_samembed_cap", None) is None:
        original = UnChunker.set_max_message_size

        def capped(self, size):
            original(self, min(int(size), UnChunker._samembed_cap))

        UnChunker.set_max_message_size = capped
    UnChunker._samembed_cap = int(max_bytes)


def token_middleware(token: str, check_origin: bool = True):
    """An aiohttp middleware answering 403 to every request that does not carry ``token``, and, with
    ``check_origin``, to a page's request from another origin than the server's (:func:`same_origin`).

    Behind a reverse proxy (``--base-path``) the origin is not checked: a proxy that does not pass the browser's
    ``Host`` on (nginx's default) makes every request look as if it came from another origin.

    The token comes as the query parameter ``token`` (the URL printed at start) or as the cookie set on the first
    request that had it, so the page's websocket, scripts and images need no change.
    """
    from aiohttp import web

    expected = token.encode()

    def carries(value: str | None) -> bool:  # (bytes: a non-ASCII value is a wrong token, not an error)
        return bool(value) and hmac.compare_digest(str(value).encode(), expected)

    @web.middleware
    async def check_token(request, handler):
        forwarded = request.headers.get("X-Forwarded-Host", "").split(",")
        if check_origin and not same_origin(request.headers.get("Origin"), [request.host, *forwarded]):
            # a page of another port of this host is "same site" to a browser, which sends it the cookie: its
            # websocket opened (a review); a page's own requests come from the server's own origin
            return web.Response(status=403, text="403: requests from another site's page are refused\n")
        cookie = token_cookie(request.host)
        from_query = carries(request.query.get("token"))
        if not (from_query or carries(request.cookies.get(cookie))):
            return web.Response(status=403, text="403: this SAMEmbedding server needs its access token; "
                                                 "open the URL printed when it started (…?token=…)\n")
        response = await handler(request)
        if from_query and not getattr(response, "prepared", False):
            response.set_cookie(cookie, token, httponly=True, samesite="Strict")
        return response

    return check_token
