"""The users file: names and scrypt password hashes for SASL PLAIN.

1. This module owns the file format, one user a line, `#` comments and blank lines allowed:
       name:scrypt:<n>:<r>:<p>:<salt base64>:<hash base64>
   and checking a password against it.
2. It must not know about SASL or connections. `UserDatabase.verify` is slow on purpose (tens of
   milliseconds) and reads only immutable data, so the router can call it from worker threads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SCHEME = "scrypt"
# Cost parameters for new hashes: 16 MiB and about 50 ms per check on a 2-core machine.
N, R, P = 2**14, 8, 1
SALT_SIZE = 16
HASH_SIZE = 32
# Bound on the memory a line's costs may ask for (128 * n * r bytes), checked when loading.
MAX_MEMORY = 2**28


class UsersError(Exception):
    """A users file that cannot be read or written, or a bad user name; says which and what to do."""


@dataclass(frozen=True, slots=True)
class _Credential:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def check(self, password: str) -> bool:
        return hmac.compare_digest(_scrypt(password, self.salt, self.n, self.r, self.p), self.digest)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # OpenSSL refuses to use more than maxmem bytes, and needs 128 * r * (n + p + 2) of them.
    maxmem = 128 * r * (n + p + 2)
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=HASH_SIZE)


# Checked when the user is unknown, so that the answer takes as long as for a known user.
_NOBODY = _Credential(N, R, P, salt=bytes(SALT_SIZE), digest=bytes(HASH_SIZE))


class UserDatabase:
    """The users of a users file, and their password check."""

    def __init__(self, credentials: Mapping[str, _Credential]) -> None:
        self._credentials = dict(credentials)

    @classmethod
    def load(cls, path: Path) -> UserDatabase:
        return cls({name: credential for name, (_, credential) in _parse(path, _read(path)).items()})

    @property
    def names(self) -> list[str]:
        """The user names, in the file's order."""
        return list(self._credentials)

    def verify(self, user: str, password: str) -> bool:
        """Whether `password` is `user`'s; as slow for an unknown user as for a known one."""
        credential = self._credentials.get(user)
        matches = (credential or _NOBODY).check(password)
        return credential is not None and matches


def add_user(path: Path, user: str, password: str) -> None:
    """Set `user`'s password, adding the user, or the file (mode 0600), if missing."""
    problem = _name_problem(user)
    if problem is not None:
        raise UsersError(problem)
    salt = secrets.token_bytes(SALT_SIZE)
    fields = [user, SCHEME, str(N), str(R), str(P), _b64(salt), _b64(_scrypt(password, salt, N, R, P))]
    line = ":".join(fields) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _rewrite(path, user, line)
        return
    except OSError as exc:
        raise UsersError(f"{path}: cannot create the users file: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(line)


def remove_user(path: Path, user: str) -> bool:
    """Remove `user`'s line; return whether the user was there."""
    return _rewrite(path, user, None)


def _name_problem(user: str) -> str | None:
    if not user or user.startswith("#") or any(c == ":" or c.isspace() for c in user):
        return f"invalid user name {user!r}: use no ':' or whitespace, and do not start with '#'"
    return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _read(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        raise UsersError(f"{path}: no such users file; create it with 'meshbus users add'") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsersError(f"{path}: cannot read the users file: {reason}") from None


def _parse(path: Path, lines: list[str]) -> dict[str, tuple[int, _Credential]]:
    """Each user's line index and credential; raise UsersError at the first bad line."""
    users: dict[str, tuple[int, _Credential]] = {}
    for index, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{index + 1}"
        fields = text.split(":")
        if len(fields) != 7:
            raise UsersError(
                f"{where}: expected name:scrypt:n:r:p:salt:hash, found {len(fields)} fields;"
                " set the password again with 'meshbus users add'"
            )
        name, scheme, *costs, salt, hashed = fields
        problem = _name_problem(name)
        if problem is not None:
            raise UsersError(f"{where}: {problem}")
        if scheme != SCHEME:
            raise UsersError(f"{where}: unknown password scheme {scheme!r}; only {SCHEME!r} is known")
        try:
            n, r, p = (int(cost) for cost in costs)
            credential = _Credential(
                n, r, p, base64.b64decode(salt, validate=True), base64.b64decode(hashed, validate=True)
            )
        except (ValueError, binascii.Error):
            raise UsersError(
                f"{where}: n, r, p must be integers and salt, hash base64;"
                " set the password again with 'meshbus users add'"
            ) from None
        if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * n * r > MAX_MEMORY or not credential.digest:
            raise UsersError(
                f"{where}: n must be a power of 2 above 1, r and p positive, 128 * n * r at most"
                f" {MAX_MEMORY} bytes and the hash not empty; set the password again with 'meshbus users add'"
            )
        if name in users:
            raise UsersError(
                f"{where}: {name!r} is also on line {users[name][0] + 1}; remove one of the lines"
            )
        users[name] = (index, credential)
    return users


def _rewrite(path: Path, user: str, line: str | None) -> bool:
    """Replace `user`'s line by `line` (None: remove it) or append `line`; say if `user` was there."""
    lines = _read(path)
    found = _parse(path, lines).get(user)
    if found is not None:
        lines[found[0] : found[0] + 1] = [line] if line is not None else []
    elif line is not None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(line)
    # Write a copy and rename it over the file, so that a reader never sees half a file.
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise UsersError(f"{path}: cannot write the users file: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.writelines(lines)
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return found is not None
