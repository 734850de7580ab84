"""The catalog's SQLite file: opening it, connections whose failures come out typed, its checks.

Every SQLite failure leaves through here typed: :class:`CorruptIndexError` for a damaged
file (checked before SQLite opens it: header, truncation), :class:`StorageError` for the
rest (disk full, read-only, I/O). :func:`chunks` cuts the lists given to ``IN (...)`` to
what one statement may bind.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from mmsearch.errors import CorruptIndexError, MMSearchError, StorageError


def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")       # readers keep working while a run writes
    cur.execute("PRAGMA synchronous=NORMAL")     # durable at each checkpoint, safe against corruption
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(path: Path, *, immutable: bool = False) -> Engine:
    if immutable:
        uri = f"file:{quote(str(path))}?immutable=1"
        engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(
            uri, uri=True, check_same_thread=False))
    else:
        engine = create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", _on_connect)
    return engine


def frozen(path: Path) -> bool:
    """Whether the catalog's file system cannot be written (read-only, or full) and no
    committed data waits in the write-ahead log, so that reading the file alone is safe."""
    try:
        if path.with_name(path.name + "-wal").stat().st_size > 0:
            return False
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return fs_hint(path) != ""


def fs_hint(path: Path) -> str:
    """`` (read-only file system)`` or `` (the disk is full)`` when so, else empty."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return ""
    if st.f_flag & os.ST_RDONLY:
        return " (read-only file system)"
    if st.f_bavail * st.f_frsize < (1 << 20):
        return " (the disk is full)"
    return ""


class WriteTxn:
    """``with catalog._write() as conn``: one transaction, storage errors made typed."""

    def __init__(self, engine: Engine, path: Path) -> None:
        self._ctx = engine.begin()
        self._path = path

    def __enter__(self) -> Connection:
        try:
            return self._ctx.__enter__()
        except DB_ERRORS as exc:
            raise typed_error(exc, "write", self._path) from exc

    def __exit__(self, *exc_info) -> bool:
        try:
            self._ctx.__exit__(*exc_info)  # commit, or roll back when the block raised
        except DB_ERRORS as exc:
            raise typed_error(exc, "write", self._path) from exc
        if exc_info[0] is not None and issubclass(exc_info[0], DB_ERRORS):
            raise typed_error(exc_info[1], "write", self._path) from exc_info[1]
        return False


class ReadConn:
    """``with catalog._read() as conn``: a connection whose SQLite errors are made typed."""

    def __init__(self, engine: Engine, path: Path) -> None:
        self._engine = engine
        self._path = path
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        try:
            self._conn = self._engine.connect()
        except DB_ERRORS as exc:
            raise typed_error(exc, "read", self._path) from exc
        return self._conn

    def __exit__(self, *exc_info) -> bool:
        assert self._conn is not None
        try:
            self._conn.close()
        except DB_ERRORS:
            pass
        if exc_info[0] is not None and issubclass(exc_info[0], DB_ERRORS):
            raise typed_error(exc_info[1], "read", self._path) from exc_info[1]
        if exc_info[0] is not None and issubclass(exc_info[0], (TypeError, ValueError,
                                                                 OverflowError)):
            # only SQLite's typeless storage can hand back a value of another type than the
            # schema's (a string id, a number for a path): the file was damaged
            raise CorruptIndexError(f"catalog {self._path} is damaged (a value of the wrong "
                                    f"type: {exc_info[1]}); see `mmsearch check`") from exc_info[1]
        return False


# what SQLite failures surface as; Python's sqlite3 raises UnicodeDecodeError for text
# (or an error message quoting text) that a damaged file turned into invalid UTF-8
DB_ERRORS = (DBAPIError, UnicodeDecodeError)

# SQLite primary result codes (https://sqlite.org/rescode.html)
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_CORRUPT, SQLITE_NOTADB = 5, 6, 11, 26


def primary_code(exc: DBAPIError) -> int | None:
    message = str(exc.orig).lower()
    if any(m in message for m in ("malformed", "corrupt", "unsupported file format",
                                  "no such table", "no such column")):
        return SQLITE_CORRUPT  # the schema is ours and fixed: a damaged one (plain SQLITE_ERROR)
    code = getattr(exc.orig, "sqlite_errorcode", None)  # Python >= 3.11
    if isinstance(code, int):
        return code & 0xFF
    if "not a database" in message:
        return SQLITE_NOTADB
    if "locked" in message:
        return SQLITE_BUSY
    return None


def typed_error(exc: "DBAPIError | UnicodeDecodeError", doing: str, path: Path) -> MMSearchError:
    """A damaged file is :class:`CorruptIndexError`; any other SQLite failure :class:`StorageError`."""
    if isinstance(exc, UnicodeDecodeError) or "decode to UTF-8" in str(exc.orig):
        return CorruptIndexError(f"catalog {path} is damaged (text that is not UTF-8); "
                                 "see `mmsearch check`")
    if primary_code(exc) in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return CorruptIndexError(f"catalog {path} is damaged ({exc.orig}); "
                                 "see `mmsearch check`")
    return StorageError(f"cannot {doing} the catalog {path}: {exc.orig}{fs_hint(path)}")


_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_sqlite_file(path: Path) -> None:
    """Refuse, before SQLite reads it, a file that is not SQLite or is shorter than its header says.

    A truncated database would otherwise open fine and fail (or return nothing)
    only once a query reaches a missing page. An empty file is accepted: it is
    a new database. While a write-ahead log holds data the size is not judged:
    a checkpoint copies page 1 (with the new size) first and the log still holds
    the pages past the end of the file (a disk that filled up mid-checkpoint
    leaves it so), and SQLite finishes the copy from the log.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(100)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return  # a new database
    except OSError as exc:
        raise StorageError(f"cannot read the catalog {path}: {exc.strerror or exc}") from exc
    if not header:
        return
    bad = f"catalog {path} is not a readable SQLite database"
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise CorruptIndexError(f"{bad}: not an SQLite file")
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise CorruptIndexError(f"{bad}: invalid page size {page_size}")
    change_counter, pages = struct.unpack(">II", header[24:32])
    valid_for = struct.unpack(">I", header[92:96])[0]
    if valid_for != change_counter or size >= pages * page_size:
        return
    try:
        if path.with_name(path.name + "-wal").stat().st_size > 0:
            return
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError(f"cannot read the catalog {path}: {exc.strerror or exc}") from exc
    raise CorruptIndexError(f"{bad}: truncated ({size} bytes, its header says "
                            f"{pages * page_size})")


def chunks(items: list, size: int) -> Iterator[list]:
    """``items`` ``size`` at a time (the lists bound to one ``IN (...)``: SQLite limits the
    variables of a statement)."""
    for i in range(0, len(items), size):
        yield items[i:i + size]
