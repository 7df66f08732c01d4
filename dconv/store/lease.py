"""One writer per output: the lease a job holds on its output while it writes it.

The lease is one small JSON object at the output's root, :data:`LEASE_NAME`::

    {"host": "node7", "pid": 4242, "id": "9f1c...", "started": "2026-12-05T22:10:00+00:00",
     "heartbeat": "2026-12-05T22:14:03.512+00:00", "timeout": 60.0}

- A job **acquires** it before it creates, opens or overwrites the output, with
  an exclusive create: ``os.open(..., O_CREAT | O_EXCL)`` on a local disk, a
  conditional PUT (``If-None-Match: *``, s3fs ``pipe_file(mode="create")``) on
  S3. Where a store has no exclusive create, the lease is written, then read
  back and checked; two jobs that start in the same instant may then both
  believe they hold it until the first renewal (a warning line says so).
- The job **renews** it every ``timeout / 4`` seconds from a daemon thread:
  each renewal first checks that the lease still holds the job's id; if
  another job has taken it, the job stops with :class:`~dconv.errors.LeaseLost`
  instead of writing on.
- The job **releases** it at the end, whatever the end (:func:`hold`).
- A lease whose heartbeat is older than the timeout its holder declared in it
  belongs to a dead job (SIGKILL, a lost
  node) and is **taken over**: locally, the stale lease is renamed aside (one
  atomic rename, which only one taker wins), checked to be the stale one, then
  the new lease is created exclusively; on an object store the stale object is
  deleted, then the new lease created exclusively. What is left: two takers in
  the same instant on an object store, or a holder that was only paused (not
  dead) for longer than the timeout, may overwrite each other's lease; the
  renewal check stops the one that lost within one interval.

Ages are measured on the reader's clock against the holder's: hosts must keep
their clocks within a few seconds (NTP) of each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping

from dconv.errors import InputError, LeaseLost
from dconv.store.locations import is_local, public_location

__all__ = ["LEASE_NAME", "DEFAULT_TIMEOUT", "LeaseInfo", "Lease", "read_lease", "check_unheld", "acquire", "hold"]

LEASE_NAME = "_lease.json"
"""The lease object, at the output's root."""

DEFAULT_TIMEOUT = 60.0
"""Seconds without a heartbeat after which a lease is taken over."""

EXCLUSIVE_PROTOCOLS = ("s3", "s3a")
"""fsspec protocols whose ``pipe_file(mode="create")`` is a conditional PUT (``If-None-Match: *``)."""


def _timestamp(seconds: float | None = None) -> str:
    """UTC, ISO 8601, milliseconds (a heartbeat's age matters to the second)."""
    when = datetime.now(timezone.utc) if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)
    return when.isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class LeaseInfo:
    """What a lease object holds.

    Attributes
    ----------
    host, pid, id : str, int, str
        The holder: its host name, its process id, a random id of this acquisition.
    started, heartbeat : str
        When it was acquired, and last renewed (UTC, ISO 8601).
    timeout : float
        The holder's timeout: it renews four times within it.
    """

    host: str
    pid: int
    id: str
    started: str
    heartbeat: str
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def new(cls, timeout: float) -> "LeaseInfo":
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, started, _timestamp(), float(timeout))

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseInfo":
        """Raises ValueError (or a subclass) on anything that is not a whole lease."""
        try:
            fields = json.loads(data)
            datetime.fromisoformat(fields["heartbeat"])  # a heartbeat that is not a time is no lease
            return cls(str(fields["host"]), int(fields["pid"]), str(fields["id"]), str(fields["started"]),
                       str(fields["heartbeat"]), float(fields.get("timeout", DEFAULT_TIMEOUT)))
        except (KeyError, TypeError, AttributeError) as e:  # JSON, but not a lease's fields
            raise ValueError(f"not a lease: {e!r}") from e

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def renewed(self) -> "LeaseInfo":
        return LeaseInfo(self.host, self.pid, self.id, self.started, _timestamp(), self.timeout)

    def age(self) -> float:
        """Seconds since the last heartbeat, on this machine's clock."""
        return time.time() - datetime.fromisoformat(self.heartbeat).timestamp()

    def holder(self) -> str:
        return f"host {self.host}, pid {self.pid}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly, with the heartbeat's age and whether it is fresh (by the holder's timeout)."""
        age = self.age()
        return {**asdict(self), "age": round(age, 3), "fresh": age <= self.timeout}


# --------------------------------------------------------------------------- where the lease object lives


@dataclass(frozen=True)
class _LeaseObject:
    """The lease object of the output at ``url``: read, exclusive create, replace, set aside, remove."""

    url: str
    storage_options: Mapping[str, Any]

    @property
    def local(self) -> bool:
        return is_local(self.url)

    def _fs(self) -> tuple[Any, str]:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url, **dict(self.storage_options))
        return fs, f"{root.rstrip('/')}/{LEASE_NAME}"

    @property
    def path(self) -> str:
        return os.path.join(self.url, LEASE_NAME) if self.local else self._fs()[1]

    @property
    def exclusive(self) -> bool:
        """Whether :meth:`create` is atomic on this store."""
        if self.local:
            return True
        protocol = self._fs()[0].protocol
        return any(name in EXCLUSIVE_PROTOCOLS for name in ((protocol,) if isinstance(protocol, str) else protocol))

    def read(self) -> tuple[bytes, float] | None:
        """The object's bytes and modification time (seconds since the epoch); None if there is none."""
        try:
            if self.local:
                with open(self.path, "rb") as file:
                    return file.read(), os.fstat(file.fileno()).st_mtime
            fs, path = self._fs()
            fs.invalidate_cache(path)
            data = fs.cat_file(path)
            return data, _modified(fs, path)
        except (FileNotFoundError, NotADirectoryError):  # no lease; or ``url`` is a file, which check_target refuses
            return None

    def create(self, data: bytes) -> bool:
        """Create the object with ``data``; False if one is there already."""
        if not self.local:
            fs, path = self._fs()
            try:
                if not self.exclusive and fs.exists(path):
                    return False
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        os.makedirs(self.url, exist_ok=True)
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        return True

    def replace(self, data: bytes) -> None:
        """Write ``data`` over the object, whole or not at all."""
        if not self.local:
            fs, path = self._fs()
            fs.pipe_file(path, data)
            return
        temporary = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as file:
            file.write(data)
        os.replace(temporary, self.path)

    def set_aside(self, stale: "LeaseInfo") -> None:
        """Remove the lease ``stale``, and only it as far as the store allows.

        Locally it is renamed aside (atomic: of two takers, one moves it) and
        checked: a lease that is not ``stale`` any more (renewed, or already
        taken over) is put back. On an object store it is deleted.
        """
        if not self.local:
            fs, path = self._fs()
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)
            return
        aside = f"{self.path}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        with contextlib.suppress(OSError, ValueError):
            with open(aside, "rb") as file:
                moved = LeaseInfo.from_bytes(file.read())
            if (moved.id, moved.heartbeat) != (stale.id, stale.heartbeat):
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)  # not ours to remove: back, unless a new lease is there
        os.remove(aside)

    def remove(self) -> None:
        if not self.local:
            fs, path = self._fs()
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


def _modified(fs: Any, path: str) -> float:
    """The modification time of ``path`` (seconds since the epoch), or now if the store does not say."""
    with contextlib.suppress(Exception):
        modified = fs.modified(path)
        return modified.timestamp() if modified.tzinfo else modified.replace(tzinfo=timezone.utc).timestamp()
    return time.time()


def _parse(found: tuple[bytes, float]) -> LeaseInfo:
    """A lease from its bytes; one being written right now, or damaged, as an unknown holder whose
    heartbeat is the object's modification time (so that it too goes stale)."""
    data, modified = found
    try:
        return LeaseInfo.from_bytes(data)
    except (ValueError, KeyError, TypeError):
        return LeaseInfo("?", 0, "", _timestamp(modified), _timestamp(modified))


def read_lease(url: str, storage_options: Mapping[str, Any] | None = None) -> LeaseInfo | None:
    """The lease on the output at ``url``, or None if no job holds one."""
    lease = _LeaseObject(str(url), dict(storage_options or {}))
    for _ in range(3):  # a local lease exists, empty, for the instant between its create and its write
        found = lease.read()
        if found is None:
            return None
        if found[0]:
            break
        time.sleep(0.05)
    return _parse(found)


def held_message(url: str, held: LeaseInfo) -> str:
    """The one line that refuses a job an output another job holds."""
    return (
        f"out {public_location(url)!r} is being written by another job ({held.holder()}, since {held.started}, "
        f"last heartbeat {held.age():.0f} s ago); wait for it, or if it is dead it is taken over after "
        f"{held.timeout:.0f} s without a heartbeat."
    )


def check_unheld(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Refuse an output that another job holds a fresh lease on (read-only: for planning).

    Raises
    ------
    InputError
        One line naming the holder and the age of its last heartbeat.
    """
    held = read_lease(url, storage_options)
    if held is not None and held.age() <= held.timeout:
        raise InputError(held_message(url, held))


# --------------------------------------------------------------------------- holding it


class Lease:
    """A lease this process holds (:func:`acquire`); :meth:`start` renews it from a daemon thread.

    Attributes
    ----------
    info : LeaseInfo
        As last written.
    lost : LeaseLost or None
        Set by the renewal that found another job's lease in place of this one.
    """

    def __init__(self, store: _LeaseObject, info: LeaseInfo, *, created_directory: bool = False) -> None:
        self._store, self.info, self.lost = store, info, None
        self._created_directory = created_directory
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def location(self) -> str:
        return public_location(self._store.url)

    @property
    def interval(self) -> float:
        """Seconds between renewals: a quarter of the timeout."""
        return self.info.timeout / 4

    def renew(self) -> None:
        """Check that the lease is still this one, then write a new heartbeat.

        Raises
        ------
        LeaseLost
            Another job's lease is in its place, or none is.
        """
        current = read_lease(self._store.url, self._store.storage_options)
        if current is None or current.id != self.info.id:
            holder = "nobody (it was removed)" if current is None else f"{current.host}:{current.pid} (id {current.id})"
            self.lost = LeaseLost(
                f"lost the lease on {self.location!r} to {holder}; this job stopped and writes nothing more."
            )
            raise self.lost
        self.info = self.info.renewed()
        self._store.replace(self.info.to_bytes())

    def check(self) -> None:
        """Raise the :class:`LeaseLost` a renewal found, if any."""
        if self.lost is not None:
            raise self.lost

    def start(self, interrupt_main: bool = False) -> None:
        """Renew every :attr:`interval` seconds until :meth:`stop`; on a lost lease, stop renewing and,
        with ``interrupt_main``, raise KeyboardInterrupt in the main thread (SIGINT, which :meth:`check` then explains)."""
        def beat() -> None:
            while not self._stop.wait(self.interval):
                try:
                    self.renew()
                except LeaseLost:
                    if interrupt_main:  # a real signal: it wakes the main thread from a blocking wait
                        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                    return
                except Exception:  # the store did not answer: try again; a lease left stale goes to another job
                    continue

        self._thread = threading.Thread(target=beat, name=f"dconv-lease-{self.info.id[:8]}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def release(self) -> None:
        """Stop renewing and remove the lease, if it is still this one (a lost one is left to its new holder)."""
        self.stop()
        current = read_lease(self._store.url, self._store.storage_options)
        if current is not None and current.id == self.info.id:
            self._store.remove()
        if self._created_directory:  # a job refused before it wrote anything leaves no empty directory
            with contextlib.suppress(OSError):
                os.rmdir(self._store.url)


def acquire(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    say: Callable[[str], None] = lambda line: None,
) -> Lease:
    """Take the lease on the output at ``url``: create it exclusively, or take over a stale one.

    Parameters
    ----------
    url, storage_options
        The output (local path or fsspec URL) and its fsspec options.
    timeout : float
        This job's lease timeout: it renews every quarter of it. Another job's lease is stale after the
        timeout that job declared in it.
    say : callable
        Gets the line that says a stale lease is taken over, and the warning on a store without exclusive create.

    Returns
    -------
    Lease
        Not renewing yet: :meth:`Lease.start`.

    Raises
    ------
    InputError
        Another job holds a fresh lease: one line naming it.
    """
    store = _LeaseObject(str(url), dict(storage_options or {}))
    created_directory = store.local and not os.path.exists(store.url)
    if not store.exclusive:
        say(
            f"dconv: warning: {public_location(url)} is on a store without exclusive create: the lease is written, "
            "then read back; two jobs started in the same instant may both write until the first renewal stops one."
        )
    held = None
    for _ in range(5):
        mine = LeaseInfo.new(timeout)
        if store.create(mine.to_bytes()):
            check = read_lease(store.url, store.storage_options)  # whose is it, on a store that can only overwrite?
            if check is not None and check.id == mine.id:
                return Lease(store, mine, created_directory=created_directory)
            held = check
        else:
            held = read_lease(store.url, store.storage_options)
        if held is None:
            continue  # released in between
        if held.age() <= held.timeout:
            raise InputError(held_message(url, held))
        say(
            f"dconv: taking over the lease of {public_location(url)} from host {held.host} pid {held.pid}: "
            f"no heartbeat for {held.age():.0f} s"
        )
        store.set_aside(held)
    raise InputError(held_message(url, held) if held else f"could not take the lease on {url!r}.")


@contextlib.contextmanager
def hold(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    say: Callable[[str], None] = lambda line: None,
) -> Iterator[Lease]:
    """Hold the lease on ``url`` while the block runs: :func:`acquire`, renew, release whatever the end.

    Run from the main thread, a lost lease interrupts it (a KeyboardInterrupt, which
    :meth:`Lease.check` turns into the :class:`LeaseLost` that explains it).
    """
    lease = acquire(url, storage_options, timeout, say)
    lease.start(interrupt_main=threading.current_thread() is threading.main_thread())
    try:
        yield lease
    finally:
        try:
            lease.release()
        except Exception as e:  # the store failed: the job's own result or error matters more
            say(f"dconv: warning: could not remove the lease of {public_location(url)} ({type(e).__name__}: {e}); "
                f"another job takes it over {lease.info.timeout:g} s after its last heartbeat")
