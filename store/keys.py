"""API keys: `lb_` + 256 random bits, shown once and stored as their SHA-256, with ordered
scopes (`admin` includes `write`, which includes `read`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update

from store.db import Database
from store.errors import InvalidInput, NotFound
from store.tables import ApiKey

SCOPES = ("read", "write", "admin")
PREFIX = "lb_"
# what create_key makes: the prefix and token_urlsafe(32); anything else is refused unread
KEY_SHAPE = re.compile(r"lb_[A-Za-z0-9_-]{43}")
# last_used_at is written at most this often per key: not one UPDATE per request
TOUCH_EVERY = dt.timedelta(seconds=60)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def implied_scopes(scopes: list[str]) -> set[str]:
    """The scopes a key holds, with those its highest scope includes."""
    highest = max((SCOPES.index(s) for s in scopes if s in SCOPES), default=-1)
    return set(SCOPES[:highest + 1])


@dataclass
class CreatedKey:
    id: int
    name: str
    key: str  # the secret: shown once, never stored
    prefix: str
    scopes: list[str]


def create_key(db: Database, name: str, scopes: list[str]) -> CreatedKey:
    if not name or len(name) > 200:
        raise InvalidInput("a key's name must be 1-200 characters")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise InvalidInput(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; "
                           f"got {scopes}")
    key = PREFIX + secrets.token_urlsafe(32)
    with db.session() as s:
        row = ApiKey(name=name, prefix=key[:10], key_hash=hash_key(key),
                     scopes=sorted(set(scopes), key=SCOPES.index))
        s.add(row)
        s.flush()
        return CreatedKey(row.id, name, key, row.prefix, list(row.scopes))


def well_formed(key: str) -> bool:
    """Whether `key` has the shape of a key this module makes (no lookup needed to refuse
    one that has not)."""
    return KEY_SHAPE.fullmatch(key) is not None


def verify_key(db: Database, key: str) -> ApiKey | None:
    """The live key row for a presented secret, or None."""
    if not key.startswith(PREFIX) or len(key) > 200:
        return None
    return verify_hash(db, hash_key(key))


def live_key(db: Database, digest: str) -> ApiKey | None:
    """The live key row whose secret hashes to `digest`, or None; reads only (a replica
    may answer it while the primary is down)."""
    with db.session() as s:
        return s.scalar(select(ApiKey).where(ApiKey.key_hash == digest,
                                             ApiKey.revoked_at.is_(None)))


def verify_hash(db: Database, digest: str) -> ApiKey | None:
    """The live key row whose secret hashes to `digest`, or None (revoked or unknown);
    its last use is recorded (at most once per TOUCH_EVERY)."""
    with db.session() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.key_hash == digest,
                                            ApiKey.revoked_at.is_(None)))
        if row is None:
            return None
        now = dt.datetime.now(dt.UTC)
        if row.last_used_at is None or now - row.last_used_at > TOUCH_EVERY:
            s.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
        return row


def list_keys(db: Database) -> list[ApiKey]:
    with db.session() as s:
        return list(s.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(db: Database, key_id: int) -> ApiKey:
    with db.session() as s:
        row = s.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"API key {key_id} does not exist")
        if row.revoked_at is None:
            row.revoked_at = dt.datetime.now(dt.UTC)
        s.flush()
        return row
