"""The web page's administrators: names and scrypt password hashes in one JSON file.

The file is ``[admin] web_admins`` (default ``web-admins.json`` in the key store),
written 0600 and atomically by ``gatekeeper admin add``/``remove`` and read again at
every login, so a change needs no restart. A record holds the name, the hash and when it
was made; never the password.

Hashes are scrypt (RFC 7914) with N=2**17, r=8, p=1 (OWASP's minimum; about 0.5 s and
128 MiB on the test machine), a random 16-byte salt and a 32-byte result, written as
``scrypt$LOG_N$R$P$SALT$HASH`` (base64). The parameters are read back from each hash,
so stronger ones can come later without breaking older records. Comparison is
constant-time, and an unknown name costs a full scrypt run too (:func:`check_login`),
so the time of an answer does not tell which names exist. Run :func:`check_login` in a
worker process: it is deliberately slow.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import attrs

from gatekeeper.config import Config
from gatekeeper.errors import GatekeeperError, InvalidPassword
from gatekeeper.keys.store import atomic_write, private_directory

__all__ = [
    "DEFAULT_LOG_N",
    "AdminAccounts",
    "AdminError",
    "AdminRecord",
    "admins_path",
    "check_login",
    "check_name",
    "hash_password",
    "verify_password",
]

DEFAULT_LOG_N = 17
_R, _P = 8, 1
_SALT_BYTES, _HASH_BYTES = 16, 32
MAX_ADMIN_PASSWORD = 1024
MIN_ADMIN_PASSWORD = 10
MAX_ADMINS_FILE = 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_FORMAT_VERSION = 1


class AdminError(GatekeeperError):
    """The administrators' file cannot be read or changed, or a name is wrong."""


def admins_path(config: Config) -> Path:
    """Where the administrators are: ``[admin] web_admins``, else ``web-admins.json`` in the key store."""
    return config.admin.web_admins or config.keys.store / "web-admins.json"


def check_name(name: str) -> str:
    """Return ``name`` if it can name an administrator (letters, digits, ``._@-``; at most 64)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise AdminError(
            "an administrator's name is 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
        )
    return name


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    memory = 128 * r * (2**log_n) * 2  # scrypt needs 128*r*N bytes; leave room for the rest
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=2**log_n, r=r, p=p, maxmem=memory + 1024 * 1024, dklen=_HASH_BYTES
    )


def hash_password(password: str, *, log_n: int = DEFAULT_LOG_N) -> str:
    """The scrypt hash of ``password`` as ``scrypt$LOG_N$R$P$SALT$HASH`` (slow on purpose)."""
    salt = os.urandom(_SALT_BYTES)
    digest = _scrypt(password, salt, log_n, _R, _P)
    encode = base64.b64encode
    return f"scrypt${log_n}${_R}${_P}${encode(salt).decode('ascii')}${encode(digest).decode('ascii')}"


def verify_password(stored: str, password: str) -> bool:
    """Tell whether ``password`` matches the ``stored`` hash (constant-time comparison).

    A malformed hash never matches (and still costs a default-strength scrypt run).
    """
    try:
        kind, log_n_text, r_text, p_text, salt_text, hash_text = stored.split("$")
        log_n, r, p = int(log_n_text), int(r_text), int(p_text)
        salt = base64.b64decode(salt_text, validate=True)
        expected = base64.b64decode(hash_text, validate=True)
        if kind != "scrypt" or not (1 <= log_n <= 22 and 1 <= r <= 32 and 1 <= p <= 16) or not expected:
            raise ValueError(kind)
    except (ValueError, binascii.Error):
        _scrypt(password, os.urandom(_SALT_BYTES), DEFAULT_LOG_N, _R, _P)
        return False
    return hmac.compare_digest(_scrypt(password, salt, log_n, r, p), expected)


@attrs.frozen(repr=False)
class AdminRecord:
    """One administrator: the name, the password hash and when the record was written."""

    name: str
    password_hash: str
    created: datetime.datetime

    def __repr__(self) -> str:
        return f"<AdminRecord {self.name} created {self.created:%Y-%m-%d}>"


class AdminAccounts:
    """The administrators' file: list, add (or replace) and remove records."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> dict[str, AdminRecord]:
        """Every administrator by name (none when the file does not exist)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise AdminError(f"cannot read the administrators' file {self.path}: {error.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(MAX_ADMINS_FILE + 1)
        if len(data) > MAX_ADMINS_FILE:
            raise AdminError(f"the administrators' file {self.path} is larger than {MAX_ADMINS_FILE} bytes")
        try:
            document: Any = json.loads(data)
            found = {}
            for name, entry in document["admins"].items():
                found[name] = AdminRecord(
                    name, str(entry["hash"]), datetime.datetime.fromisoformat(str(entry["created"]))
                )
            return found
        except (ValueError, KeyError, TypeError, AttributeError):
            raise AdminError(f"the administrators' file {self.path} is damaged (not Gatekeeper's JSON)") from None

    def add(self, name: str, password: str, *, replace: bool = False, log_n: int = DEFAULT_LOG_N) -> AdminRecord:
        """Add ``name`` with ``password`` (hashed here: slow); ``replace`` changes an existing one's password."""
        check_name(name)
        check_admin_password(password)
        records = self.records()
        if name in records and not replace:
            raise AdminError(f"the administrator {name} already exists (use --replace to set a new password)")
        record = AdminRecord(
            name, hash_password(password, log_n=log_n), datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        )
        records[name] = record
        self._write(records)
        return record

    def remove(self, name: str) -> bool:
        """Remove ``name``; False when there was no such administrator."""
        records = self.records()
        if records.pop(name, None) is None:
            return False
        self._write(records)
        return True

    def _write(self, records: dict[str, AdminRecord]) -> None:
        document = {
            "version": _FORMAT_VERSION,
            "admins": {
                name: {"hash": record.password_hash, "created": record.created.isoformat()}
                for name, record in sorted(records.items())
            },
        }
        if not self.path.parent.exists():
            private_directory(self.path.parent)
        atomic_write(self.path, json.dumps(document, indent=1).encode("utf-8") + b"\n")


def check_admin_password(password: str) -> None:
    """Raise :class:`InvalidPassword` unless ``password`` is acceptable for an administrator."""
    if not isinstance(password, str) or len(password) < MIN_ADMIN_PASSWORD:
        raise InvalidPassword(f"an administrator's password has at least {MIN_ADMIN_PASSWORD} characters")
    if len(password) > MAX_ADMIN_PASSWORD:
        raise InvalidPassword(f"an administrator's password has at most {MAX_ADMIN_PASSWORD} characters")


def check_login(path: Path, name: str, password: str) -> bool:
    """Tell whether ``name`` may log in with ``password`` (in a worker: one scrypt run, whoever asks).

    An unknown name, an over-long password or an unreadable file costs the same scrypt
    run as a wrong password, and answers False.
    """
    if not isinstance(password, str) or not password or len(password) > MAX_ADMIN_PASSWORD:
        _scrypt(secrets.token_hex(8), os.urandom(_SALT_BYTES), DEFAULT_LOG_N, _R, _P)
        return False
    try:
        record = AdminAccounts(path).records().get(name)
    except AdminError:
        record = None
    if record is None:
        _scrypt(password, os.urandom(_SALT_BYTES), DEFAULT_LOG_N, _R, _P)
        return False
    return verify_password(record.password_hash, password)
