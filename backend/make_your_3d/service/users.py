"""Per-user tokens for the remote listener (`make-your-3d users add|list|remove`).

Each user has one token, shown once when the user is added and never stored: the file keeps a
random salt and SHA-256(salt + token). A token is 256 random bits, so a slow password hash
(scrypt) would add nothing against guessing and would cost every request milliseconds; salting
keeps two users' entries unrelated. Checking compares against every user with
`hmac.compare_digest`, so the time taken says nothing about which entry came close.

The file (DATA/users.json, 0600) is written atomically under a lock, so `users add` works while
the backend runs; the backend re-reads it when it changes, so a removed user is refused at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from make_your_3d.errors import BadRequest, DataUnwritable, NotFound

USERS_FILE = "users.json"
TOKEN_PREFIX = "m3d_"
TOKEN_BYTES = 32  # 256 random bits
SALT_BYTES = 16
MAX_TOKEN_CHARS = 256  # a longer Authorization value is not one of ours; refused without hashing
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


@dataclass(frozen=True)
class User:
    name: str
    created_at: float


def _digest(salt: bytes, token: str) -> bytes:
    return hashlib.sha256(salt + token.encode("utf-8", "surrogateescape")).digest()


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise BadRequest(f"{name!r} is not a user name: use 1-64 letters, digits, '.', '_', '-' or '@', starting with a letter or digit.")
    return name


class UserStore:
    """The users file of one data folder."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / USERS_FILE
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: list[tuple[str, bytes, bytes]] = []  # (name, salt, digest)

    # -- file ------------------------------------------------------------------------------------
    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """One writer at a time across processes (two `users add` at once must not lose one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(USERS_FILE + ".lock"), "a+") as fh:
            if os.name != "nt":
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"users": {}}
        except (OSError, ValueError) as exc:
            raise DataUnwritable(f"The users file {self.path} is not readable ({exc}). Restore it from a backup, or move it away "
                                 "and add the users again.") from None
        if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
            raise DataUnwritable(f"The users file {self.path} is damaged. Move it away and add the users again.")
        return data

    def _write(self, data: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".users-", suffix=".json", dir=self.path.parent)
        try:
            os.chmod(tmp, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- commands --------------------------------------------------------------------------------
    def add(self, name: str) -> str:
        """Add a user; returns the token (the only time it exists outside the client)."""
        check_name(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        salt = secrets.token_bytes(SALT_BYTES)
        with self._file_lock():
            data = self._read()
            if name in data["users"]:
                raise BadRequest(f"The user {name!r} exists. Remove it first (`make-your-3d users remove {name}`) to issue a new token.")
            data["users"][name] = {"salt": salt.hex(), "sha256": _digest(salt, token).hex(), "created_at": time.time()}
            self._write(data)
        return token

    def remove(self, name: str) -> None:
        with self._file_lock():
            data = self._read()
            if name not in data["users"]:
                raise NotFound(f"There is no user {name!r}; `make-your-3d users list` shows them.")
            del data["users"][name]
            self._write(data)

    def list(self) -> list[User]:
        users = self._read()["users"]
        return sorted((User(name, float(u.get("created_at") or 0)) for name, u in users.items()), key=lambda u: u.name)

    # -- the server's side -------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Re-read the file when it changed (inode, size or time): a removed user is refused at once."""
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        entries = []
        for name, u in self._read()["users"].items():
            try:
                entries.append((name, bytes.fromhex(u["salt"]), bytes.fromhex(u["sha256"])))
            except (KeyError, TypeError, ValueError):
                continue  # a damaged entry authenticates nobody
        self._entries, self._stamp = entries, stamp

    def authenticate(self, token: str) -> str | None:
        """The user whose token this is, or None."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        with self._lock:
            self._refresh()
            entries = self._entries
        found = None
        for name, salt, digest in entries:  # every entry, always: the time does not depend on which matched
            if hmac.compare_digest(_digest(salt, token), digest):
                found = name
        return found
