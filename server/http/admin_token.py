"""Where the admin token comes from when the server starts (`run_server`, i.e. `python -m server serve`).

1. `--admin-token` / `FR_ADMIN_TOKEN` (settings.admin_token): used as given; no file is read or written.
2. else `<data_dir>/admin-token`, when it exists: the token stored by an earlier first run (or put there
   by the operator, one line).
3. else, on a first run (no storage yet: SQLite's file does not exist): a new token
   (`secrets.token_urlsafe`) is written there, mode 0600, atomically (temp file, fsync, link into place).
4. else (data from an earlier version, or a server database such as PostgreSQL, where replicas
   must share one token: give them FR_ADMIN_TOKEN) the admin API stays off, as before.

In cases 2 and 3 one line goes to stdout (not to the logging system, and on every start so an operator
who lost it finds it again): the web page's URL with the token in its fragment, `/ui/#admin=<token>`.
A browser never sends a fragment to the server, so the token reaches neither the HTTP requests nor any
access log; the page takes it from `location.hash`, keeps it in sessionStorage and clears the address bar.
The server never sends the token back in any response.

`create_app(settings)` itself reads no file: its admin routes exist only when settings.admin_token is set.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from server.config import Settings

log = logging.getLogger(__name__)

TOKEN_FILE = "admin-token"
FRAGMENT = "admin"  # /ui/#admin=<token>
TOKEN_BYTES = 32  # 256 random bits, 43 URL-safe characters
_ANY_HOST = {"", "0.0.0.0", "::", "[::]"}


class AdminTokenError(RuntimeError):
    """The stored token cannot be used (unreadable or empty file); the server does not start."""


@dataclass(frozen=True)
class AdminToken:
    token: str  # "" when the admin API stays off
    source: str  # "explicit" | "stored" | "created" | "none"
    path: Path | None = None  # the token file (stored, created)


def token_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / TOKEN_FILE


def resolve(settings: Settings) -> AdminToken:
    """The admin token to serve with, by the rules in the module docstring (creating it on a first run)."""
    if settings.admin_token:
        return AdminToken(settings.admin_token, "explicit")
    path = token_path(settings)
    if path.exists():
        return AdminToken(_read(path), "stored", path)
    if not _first_run(settings):
        return AdminToken("", "none")
    return AdminToken(_create(path), "created", path)


def console_url(settings: Settings, token: str) -> str:
    """The page's URL holding `token` in its fragment; a wildcard bind address becomes localhost."""
    host = settings.host.strip()
    if host in _ANY_HOST:
        host = "localhost"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{settings.port}/ui/#{FRAGMENT}={token}"


def prepare(settings: Settings, out=None) -> Settings:
    """`settings` with the resolved admin token; prints the page's URL line when the token is the
    data dir's. AdminTokenError when the stored token is unusable."""
    found = resolve(settings)
    if found.source in ("stored", "created"):
        how = "created on first run, stored in" if found.source == "created" else "stored in"
        line = f"Admin console (admin token {how} {found.path}): {console_url(settings, found.token)}"
        print(line, file=out, flush=True)
    elif found.source == "explicit":
        log.info("admin API on: token from --admin-token / FR_ADMIN_TOKEN")
    return settings.with_(admin_token=found.token)


def _first_run(settings: Settings) -> bool:
    from server.storage import sqlite_path

    db = sqlite_path(settings)
    return db is not None and not db.exists()


def _read(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminTokenError(f"the admin token file {path} cannot be read: {exc}") from None
    if not token or any(c.isspace() for c in token):
        raise AdminTokenError(f"the admin token file {path} must hold one token on one line "
                              "(delete it to have a new one made on a fresh data dir, or set FR_ADMIN_TOKEN)")
    if stat.S_IMODE(mode) & 0o077:
        log.warning("the admin token file %s can be read by other users (mode %04o): chmod 600 it",
                    path, stat.S_IMODE(mode))
    return token


def _create(path: Path) -> str:
    """A new token written to `path` (mode 0600) atomically; when another process made one first, that one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a token another process stored meanwhile
        except FileExistsError:
            return _read(path)
        except OSError:  # a file system without hard links
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return token


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
