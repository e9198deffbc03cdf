"""Who is calling: bearer tokens, from a tokens file or one random token for the owner."""

from __future__ import annotations

import difflib
import getpass
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_TOKEN_CHARS = 22  # 128 bits of urlsafe base64
# what a user's entry may hold; anything else is a typo that would be silently ignored
# (a misspelled "admn" or "max_jbos" would leave a user without the rights or limits meant)
ENTRY_KEYS = ("token", "admin", "max_jobs", "max_gpus")


class TokensFileError(Exception):
    """The tokens file is missing, unreadable, malformed or too open."""


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False
    # per-user limits from the tokens file ({"max_jobs": 2, "max_gpus": 4})
    limits: dict[str, int] = field(default_factory=dict, compare=False, hash=False)


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), never briefly readable by others, and
    whole: on disk before it replaces the old one (a crash, even of the machine, leaves one
    or the other)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_tokens_file(path: Path) -> dict[str, User]:
    """``{"alice": "tok", "bob": {"token": "tok", "admin": true}}`` as token -> user."""
    try:
        st = path.stat()
        raw = path.read_text()
    except OSError as exc:
        raise TokensFileError(f"cannot read the tokens file {path}: {exc.strerror}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokensFileError(
            f"the tokens file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {path}"
        )

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:  # JSON keeps the last in silence: the first one's token refused
                raise TokensFileError(
                    f"{key!r} appears twice in one object of the tokens file {path}, and JSON "
                    "keeps only the last: write it once (a user's entry once; two people of "
                    "one name as e.g. alice.smith and alice.jones)")
            seen[key] = value
        return seen

    try:
        data = json.loads(raw, object_pairs_hook=unique)
    except ValueError as exc:
        raise TokensFileError(f"the tokens file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise TokensFileError(
            f'the tokens file {path} must be a JSON object of user names to tokens, e.g. {{"alice": "..."}}'
        )
    tokens: dict[str, User] = {}
    for name, value in data.items():
        if not name.strip():
            raise TokensFileError(f"a user in the tokens file {path} has an empty name; write "
                                  "each user's name (it is who their jobs belong to)")
        clean = "".join(c for c in name if c >= " " and c != "\x7f").strip()
        if clean != name:
            # ("Bob " for bob is a typo that renames a user: their queued jobs cancelled; and
            # a line break in a name would forge a line of the gateway's log)
            raise TokensFileError(
                f"user {name!r} in the tokens file {path} has white space at an end of the "
                f"name, or a line break or control character in it; write it as {clean!r}")
        admin = False
        limits: dict[str, int] = {}
        if isinstance(value, dict):
            for key in value:
                if key not in ENTRY_KEYS:
                    close = difflib.get_close_matches(str(key), ENTRY_KEYS, n=1, cutoff=0.5)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise TokensFileError(
                        f"user {name!r} in {path} has an unknown key {key!r}; {hint}an entry "
                        f"may hold only {', '.join(ENTRY_KEYS)}")
            admin = value.get("admin", False)
            # only JSON true or false: bool("false") is True, and would make an admin
            if not isinstance(admin, bool):
                raise TokensFileError(
                    f"admin of user {name!r} in {path} is {json.dumps(admin)}; write true or "
                    "false (JSON, without quotes)")
            for key in ("max_jobs", "max_gpus"):
                if key in value:
                    # (bool is an int in Python: true would read as 1)
                    if (not isinstance(value[key], int) or isinstance(value[key], bool)
                            or value[key] < 0):
                        raise TokensFileError(
                            f"{key} of user {name!r} in {path} is {json.dumps(value[key])}; "
                            "it must be a whole number >= 0, e.g. 2")
                    limits[key] = value[key]
            value = value.get("token")
        make = "make one with: python -c 'import secrets; print(secrets.token_hex(32))'"
        if not isinstance(value, str):
            # (its kind, never its value: this goes to the gateway's log)
            what = "missing" if value is None else f"a JSON {_json_kind(value)}, not a string"
            raise TokensFileError(f"the token of user {name!r} in {path} is {what}; {make}")
        if len(value) < MIN_TOKEN_CHARS:
            raise TokensFileError(
                f"the token of user {name!r} in {path} has {len(value)} characters, fewer than "
                f"{MIN_TOKEN_CHARS} (128 bits); {make}")
        if value != value.strip():  # clients drop it: their token would never match
            raise TokensFileError(
                f"the token of user {name!r} in {path} starts or ends with white space, which "
                "clients drop before sending it: remove it")
        if any(not (" " <= c <= "~") for c in value):
            raise TokensFileError(
                f"the token of user {name!r} in {path} holds a line break, a control character "
                f"or a non-ASCII one, which a request's header cannot carry; {make}")
        if value in tokens:
            raise TokensFileError(f"users {tokens[value].name!r} and {name!r} in {path} share a "
                                  f"token: give each their own ({make})")
        tokens[value] = User(str(name), admin, limits)
    return tokens


def _json_kind(value: Any) -> str:
    return {bool: "true or false", int: "number", float: "number", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)


def new_token() -> str:
    """A random token (256 bits) that never starts with '-': it is typed after --token, where
    a leading '-' reads as an option (1 urlsafe token in 64 did)."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def owner_token(state_dir: Path) -> tuple[dict[str, User], Path]:
    """One random token for the user who started the gateway, kept in ``<state-dir>/token``."""
    path = state_dir / "token"
    token = None
    if path.exists():
        token = path.read_text().strip() or None
        os.chmod(path, 0o600)
    if token is None or len(token) < MIN_TOKEN_CHARS:
        token = new_token()
        write_private(path, token + "\n")
    return {token: User(getpass.getuser(), admin=True)}, path


def bearer(header: str | None) -> str | None:
    """The token an ``Authorization: Bearer TOKEN`` header offers; None for another scheme."""
    scheme, _, rest = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":  # (a scheme's name is case-insensitive, RFC 7235)
        return None
    return rest.strip()


class Authenticator:
    """Maps a bearer token to its user, comparing in constant time."""

    def __init__(self, tokens: dict[str, User]) -> None:
        self._tokens = dict(tokens)

    def replace(self, tokens: dict[str, User]) -> None:
        self._tokens = dict(tokens)

    def users(self) -> set[str]:
        return {u.name for u in self._tokens.values()}

    def pairs(self) -> list[tuple[str, User]]:
        """Each token with its user."""
        return list(self._tokens.items())

    def user(self, name: str) -> User | None:
        """The user of that name, with their limits from the tokens file; None for none."""
        return next((u for u in self._tokens.values() if u.name == name), None)

    def user_for(self, header: str | None) -> User | None:
        offered = bearer(header)
        if offered is None:
            return None
        found = None
        for token, user in self._tokens.items():
            # compare against every token so the time does not depend on which one matched
            if hmac.compare_digest(offered.encode(), token.encode()):
                found = user
        return found
