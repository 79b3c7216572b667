"""The Responses API's store: what ``previous_response_id`` continues and GET /v1/responses/{id} returns.

One SQLite file in the node's run dir, shared by every gunicorn worker process of the node (a
response one worker answered is continued or fetched through another): WAL mode, so readers never
wait for the writer, and a short busy timeout for writers. Each row is a response object and the
conversation that produced it (chat messages: its input after parsing, then its output as an
assistant turn). Bounded twice: at most ``max_entries`` rows (each write drops the oldest beyond
it) and none older than ``ttl_s`` (dropped on each write, never returned once expired). A store
with ``max_entries`` 0, or without a path, is off: nothing is kept and nothing is found.

Each entry belongs to the API key that created it (``owner``: its ``key_id``): another key neither
finds, continues nor deletes it (a 404, as for an unknown id). A node without keys has no owners.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from typing import Any

import falcon

from cortex.api.auth import key_id, presented_key
from cortex.api.errors import ApiError

log = logging.getLogger(__name__)
BUSY_TIMEOUT_S = 2.0
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS responses ("
    "seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, created REAL NOT NULL, "
    "response TEXT NOT NULL, messages TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '')"
)


def owner_of(req: falcon.Request) -> str:
    """Whose entries a request may see: its API key's id, or "" when it presents none."""
    key = presented_key(req)
    return key_id(key) if key else ""


class ResponseStore:
    def __init__(self, path: str | None, max_entries: int = 1000, ttl_s: float = 3600.0):
        self.path, self.max_entries, self.ttl_s = path, max_entries, ttl_s
        self.enabled = bool(path) and max_entries > 0
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0

    def _db(self) -> sqlite3.Connection:
        """This process's connection (opened after gunicorn forks: a connection never crosses a fork)."""
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # a crash may lose the last answers, never corrupt
            conn.execute(SCHEMA)
            if "owner" not in {row[1] for row in conn.execute("PRAGMA table_info(responses)")}:
                conn.execute("ALTER TABLE responses ADD COLUMN owner TEXT NOT NULL DEFAULT ''")  # an older file
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def put(self, response_id: str, response: dict, messages: list[dict[str, Any]], owner: str = "") -> bool:
        """Keep one response; False (logged) when the store is off or failed: the answer is sent anyway."""
        if not self.enabled:
            return False
        try:
            self._put(response_id, response, messages, owner)
            return True
        except sqlite3.Error as exc:  # a locked or unwritable file costs the entry, never the answer
            log.warning("response %s not stored: %s", response_id, exc)
            return False

    def _put(self, response_id: str, response: dict, messages: list[dict[str, Any]], owner: str) -> None:
        now = time.time()
        row = (response_id, now, json.dumps(response), json.dumps(messages), owner)
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR REPLACE INTO responses (id, created, response, messages, owner) VALUES (?,?,?,?,?)", row
                )
                db.execute("DELETE FROM responses WHERE created < ?", (now - self.ttl_s,))
                db.execute(
                    "DELETE FROM responses WHERE seq IN (SELECT seq FROM responses ORDER BY seq DESC LIMIT -1 OFFSET ?)",
                    (self.max_entries,),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def get(self, response_id: str, owner: str = "") -> tuple[dict, list[dict[str, Any]]] | None:
        """(the response object, its conversation), or None when unknown, expired, another key's, or
        the store is off."""
        if not self.enabled:
            return None
        with self._lock:
            row = (
                self._db()
                .execute(
                    "SELECT response, messages FROM responses WHERE id = ? AND created >= ? AND owner = ?",
                    (response_id, time.time() - self.ttl_s, owner),
                )
                .fetchone()
            )
        return (json.loads(row[0]), json.loads(row[1])) if row else None

    def delete(self, response_id: str, owner: str = "") -> bool:
        """True when a live entry of ``owner`` was removed."""
        if not self.enabled:
            return False
        with self._lock:
            db = self._db()
            cur = db.execute(
                "DELETE FROM responses WHERE id = ? AND created >= ? AND owner = ?",
                (response_id, time.time() - self.ttl_s, owner),
            )
            return cur.rowcount > 0

    def count(self) -> int:
        if not self.enabled:
            return 0
        with self._lock:
            return self._db().execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def not_found(response_id: str) -> ApiError:
    return ApiError(404, f"No response found with id '{response_id}'.", "invalid_request_error", "not_found")


class StoredResponses:
    """GET /v1/responses/{response_id}: the stored response object; DELETE removes it. An unknown
    or expired id is a 404 in the OpenAI envelope."""

    def __init__(self, store: ResponseStore):
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response, response_id: str) -> None:
        found = self.store.get(response_id, owner_of(req))
        if found is None:
            raise not_found(response_id)
        resp.media = found[0]

    def on_delete(self, req: falcon.Request, resp: falcon.Response, response_id: str) -> None:
        if not self.store.delete(response_id, owner_of(req)):
            raise not_found(response_id)
        resp.media = {"id": response_id, "object": "response", "deleted": True}
