"""etcd's v3 API over gRPC (aetcd's stubs and watch multiplexer), native to fleetd's event loop.

- TTLs are leases: `put(..., ttl=)` grants one and attaches the key; `refresh` is one
  keepalive, which emits no watch event, so heartbeats wake nobody.
- Compare-and-swap and create-only writes are transactions.
- Every request asks for a member with a leader (etcd's "hasleader" metadata, as Go's
  clientv3.WithRequireLeader): a member cut off from the majority answers "no leader" at once
  instead of holding the request until it times out, so the store tries the next member, and
  when none has a leader it says that etcd lost its quorum (NoQuorum), not that it is down.
- `wait` opens a prefix watch from a revision on the client's one gRPC watch stream and keeps
  it open for the next waits, so events arrive as etcd applies them. A compacted revision is
  reported as HistoryLost; the caller re-lists and continues from the new revision.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

# fleetd forks only to exec (health checks, tools). gRPC's fork handlers, run while its threads
# were busy, made such a child abort before its exec (SIGABRT), so they stay off.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
from aetcd import exceptions as aetcd_errors
from aetcd import rpc
from aetcd.utils import prefix_range_end
from aetcd.watcher import Watcher

from fleetpy.registry.store import (
    NO_CREDENTIALS,
    AlreadyExists,
    Change,
    CompareFailed,
    Credentials,
    DataLineage,
    HistoryLost,
    Listing,
    NoQuorum,
    Op,
    Put,
    StoreError,
    Unavailable,
    require_servers,
)

T = TypeVar("T")

# How long a watch stream stays open with nobody waiting on it.
WATCH_LINGER = 60.0
# etcd's default --max-txn-ops: the most operations one transaction may hold.
MAX_TXN_OPS = 128
# How many transactions of one large batch are in flight at once.
CONCURRENT_TXNS = 8

# A member that did not answer, or answered "not now": worth retrying, possibly on another one.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
# Sent with every request and stream: a member without a leader refuses them at once (etcd's
# rpctypes.MetadataRequireLeaderKey), and closes a stream whose member loses its leader.
_REQUIRE_LEADER = ("hasleader", "true")
# What such a member answers (etcd's rpctypes.ErrGRPCNoLeader, code UNAVAILABLE).
_NO_LEADER = "etcdserver: no leader"
# gRPC's own reconnect backoff grows to minutes; an etcd restart must be noticed within a second.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # gRPC refuses answers over 4 MB by default; listing a registry of 10,000 units is 7 MB.
    # etcd bounds requests, not answers (etcdctl lifts this limit the same way).
    ("grpc.max_receive_message_length", 2**31 - 1),
)


class _Watcher(Watcher):
    """aetcd's watch multiplexer, plus one case it ignores: etcd refusing a watch at creation.

    etcd checks a new watch against the token the stream was opened with; once that token has
    expired it answers "created, canceled: permission denied", which aetcd would take as a live
    watch that never delivers. It becomes UnauthenticatedError, so the store logs in again."""

    async def _handle_response(self, response: Any) -> None:
        if response.created and response.canceled and self._new_callback is not None:
            async with self._lock:
                self._new_callback.error = aetcd_errors.UnauthenticatedError(response.cancel_reason)
                self._new_callback_ready.notify_all()
            return
        await super()._handle_response(response)


class _LoggedInAgain(Exception):
    """The watch stream was closed by the store itself, to log in again: not an outage."""


@dataclass
class _Connection:
    url: str  # of the member it talks to
    channel: grpc.aio.Channel
    kv: Any
    lease: Any
    watcher: Watcher
    metadata: tuple[tuple[str, str], ...]
    closed: bool = False  # by the store (a member failed, or a new login), see _call


class EtcdV3Store:
    """etcd's v3 API, retrying with bounded exponential backoff across the members."""

    # One transaction per 128 ops: a batch that fits is written whole or not at all.
    atomic_batches = True

    def __init__(
        self,
        servers: list[str],
        *,
        retry_for: float = 10.0,
        request_timeout: float = 5.0,
        credentials: Credentials = NO_CREDENTIALS,
    ):
        require_servers(servers)
        self._targets = [_target(url) for url in servers]
        self._urls = servers
        self._current = 0
        self._retry_for = retry_for
        self._timeout = request_timeout
        self._credentials = credentials
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()
        self._last_failure = -float("inf")
        # Since the latest request that failed, each member's latest failure (by URL); emptied
        # when a request succeeds. What `outage` tells.
        self._failures: dict[str, grpc.aio.AioRpcError | aetcd_errors.ClientError] = {}
        self._leases: dict[str, int] = {}  # key -> the lease this store attached to it
        self._watches: dict[str, _PrefixWatch] = {}
        self._opening: set[asyncio.Task] = set()  # watches being opened (see _open_watch)
        self._lineage = DataLineage()  # members by their id in answers' headers

    # -- connection -------------------------------------------------------------------------
    async def _connect(self) -> _Connection:
        if self._connection is not None:  # every call passes here: no lock while connected
            return self._connection
        async with self._connecting:
            if self._connection is not None:
                return self._connection
            scheme, target = self._targets[self._current]
            creds = self._credentials
            if scheme == "https":
                channel_credentials = grpc.ssl_channel_credentials(
                    root_certificates=_read(creds.ca_cert),
                    private_key=_read(creds.cert[1]) if creds.cert else None,
                    certificate_chain=_read(creds.cert[0]) if creds.cert else None,
                )
                channel = grpc.aio.secure_channel(target, channel_credentials, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
            metadata: tuple[tuple[str, str], ...] = (_REQUIRE_LEADER,)
            try:
                if creds.username:
                    auth = rpc.AuthStub(channel)
                    request = rpc.AuthenticateRequest(name=creds.username, password=creds.password or "")
                    response = await auth.Authenticate(request, timeout=self._timeout, metadata=metadata)
                    metadata = (*metadata, ("token", response.token))
            except BaseException:
                await channel.close()
                raise
            self._connection = _Connection(
                self._urls[self._current],
                channel,
                rpc.KVStub(channel),
                rpc.LeaseStub(channel),
                _Watcher(rpc.WatchStub(channel), timeout=self._timeout, metadata=metadata),
                metadata,
            )
            return self._connection

    async def _drop(self, connection: _Connection, next_member: bool, relogin: bool = False) -> None:
        """Forget a connection (a failed member's, or an expired token's); the next call dials."""
        if self._connection is not connection:
            return
        self._connection = None
        connection.closed = True
        if next_member:
            self._current = (self._current + 1) % len(self._targets)
        if relogin:
            for watch in self._watches.values():
                watch.closed_by_us(connection)
        with contextlib.suppress(Exception):
            await connection.watcher.shutdown()
        with contextlib.suppress(Exception):
            await connection.channel.close()

    async def _call(self, operation: Callable[[_Connection], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self._retry_for
        delay = 0.05
        reauthenticated = False
        while True:
            self._lineage.check_usable()
            connection = None
            floors = self._lineage.floors()  # as they were when this request went out
            try:
                connection = await self._connect()
                result = await operation(connection)
                self._answered(connection.url, floors, result)
                self._failures.clear()
                return result
            except aetcd_errors.RevisionCompactedError:
                raise
            except asyncio.CancelledError:
                # gRPC cancels every call in flight on a channel the store closes (another
                # call saw its member fail, or logged in again): that is not our caller being
                # cancelled, and the call goes again on the new connection.
                task = asyncio.current_task()
                if connection is None or not connection.closed or (task is not None and task.cancelling()):
                    raise
                if time.monotonic() > deadline:
                    raise Unavailable(f"etcd at {', '.join(self._urls)} kept failing over") from None
                continue
            except (grpc.aio.AioRpcError, aetcd_errors.ClientError) as error:
                code = _code_of(error)
                if code == grpc.StatusCode.UNAUTHENTICATED and not reauthenticated and connection:
                    # Simple tokens expire after a quiet spell; log in again once.
                    reauthenticated = True
                    await self._drop(connection, next_member=False, relogin=True)
                    continue
                if code not in _TRANSIENT:
                    raise StoreError(f"etcd refused the request: {_details(error)}") from None
                # A failed dial (or login) was on the current member.
                self._failed(connection.url if connection else self._urls[self._current], error)
                if connection is not None and len(self._targets) > 1:
                    await self._drop(connection, next_member=True)
                elif connection is None:
                    # Dialing failed (logging in is the first call on a member): the next one.
                    self._current = (self._current + 1) % len(self._targets)
                if time.monotonic() + delay > deadline:
                    raise self.outage() or _unreachable(self._urls, error) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _answered(self, url: str, floors: dict[object, int], result: Any) -> None:
        """Check the answer's header (a watch's creation has none) against earlier answers."""
        header = getattr(result, "header", None)
        if header is not None and header.cluster_id:
            floor = floors.get(header.member_id, 0)
            self._lineage.seen(url, header.member_id, floor, header.revision, f"{header.cluster_id:x}")

    def _failed(self, member: str, error: grpc.aio.AioRpcError | aetcd_errors.ClientError) -> None:
        self._last_failure = time.monotonic()
        self._failures[member] = error

    def last_failure(self) -> float:
        return self._last_failure

    def outage(self) -> Unavailable | None:
        if self._lineage.replaced is not None:
            return self._lineage.replaced
        if not self._failures:
            return None
        leaderless = [url for url in self._urls if _no_leader(self._failures.get(url))]
        if not leaderless:
            return _unreachable(self._urls, list(self._failures.values())[-1])
        silent = [url for url in self._urls if url in self._failures and url not in leaderless]
        answer = "answers but has" if len(leaderless) == 1 else "answer but have"
        message = f"etcd has lost its quorum: {_members(leaderless)} {answer} no leader"
        if silent:
            message += f", and {_members(silent)} {'does' if len(silent) == 1 else 'do'} not answer"
        return NoQuorum(f"{message}; etcd takes no reads or writes until a majority of its members is back")

    async def close(self) -> None:
        for opening in list(self._opening):
            opening.cancel()
        self._watches.clear()
        if self._connection is not None:
            await self._drop(self._connection, next_member=False)

    # -- reads ------------------------------------------------------------------------------
    async def _range(self, request: rpc.RangeRequest) -> Any:
        return await self._call(lambda c: c.kv.Range(request, timeout=self._timeout, metadata=c.metadata))

    async def get(self, key: str) -> str | None:
        response = await self._range(rpc.RangeRequest(key=key.encode()))
        return response.kvs[0].value.decode() if response.kvs else None

    async def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        found = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), MAX_TXN_OPS):
            reads = [
                rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode()))
                for key in unique[start : start + MAX_TXN_OPS]
            ]
            response = await self._txn(rpc.TxnRequest(success=reads))
            for answer in response.responses:
                found.update({kv.key.decode(): kv.value.decode() for kv in answer.response_range.kvs})
        return found

    async def list(self, prefix: str) -> Listing:
        directory = (prefix.rstrip("/") + "/").encode()
        response = await self._range(rpc.RangeRequest(key=directory, range_end=prefix_range_end(directory)))
        return Listing({kv.key.decode(): kv.value.decode() for kv in response.kvs}, response.header.revision)

    async def index(self, prefix: str) -> int:
        # Any read answers with the store's revision; counting one key of ours is the cheapest
        # (and the one a user allowed only the registry's prefix may do).
        request = rpc.RangeRequest(key=prefix.encode(), count_only=True)
        return (await self._range(request)).header.revision

    # -- writes -----------------------------------------------------------------------------
    async def _txn(self, request: rpc.TxnRequest) -> Any:
        return await self._call(lambda c: c.kv.Txn(request, timeout=self._timeout, metadata=c.metadata))

    async def _grant(self, ttl: float) -> int:
        request = rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))
        response = await self._call(
            lambda c: c.lease.LeaseGrant(request, timeout=self._timeout, metadata=c.metadata)
        )
        return response.ID

    async def _revoke(self, lease: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease)
        with contextlib.suppress(StoreError):
            await self._call(
                lambda c: c.lease.LeaseRevoke(request, timeout=self._timeout, metadata=c.metadata)
            )

    async def put(
        self,
        key: str,
        value: str,
        ttl: float | None = None,
        *,
        create_only: bool = False,
        prev_value: str | None = None,
    ) -> int:
        compare = []
        if create_only:
            compare.append(_compare_created(key, 0))
        if prev_value is not None:
            compare.append(_compare_value(key, prev_value))
        lease = await self._grant(ttl) if ttl is not None else 0
        put = rpc.PutRequest(key=key.encode(), value=value.encode(), lease=lease)
        response = await self._txn(rpc.TxnRequest(compare=compare, success=[rpc.RequestOp(request_put=put)]))
        if not response.succeeded:
            if lease:
                await self._revoke(lease)
            raise AlreadyExists(key) if create_only else CompareFailed(key)
        if lease:
            self._leases[key] = lease
        elif ttl is None:
            self._leases.pop(key, None)
        return response.header.revision

    async def apply(self, ops: Sequence[Op]) -> int:
        plain = [op for op in ops if not (isinstance(op, Put) and op.create_only)]
        conditional = [op for op in ops if isinstance(op, Put) and op.create_only]
        # Conditional ops go last, so the transaction holding them also holds what precedes.
        chunks = [
            (plain + conditional)[start : start + MAX_TXN_OPS] for start in range(0, len(ops), MAX_TXN_OPS)
        ]
        # The transactions of unconditional ops alone go out together (at most one op per key,
        # so their order does not matter); those holding conditional ops go once they are all
        # written, one after another.
        if len(chunks) == 1:  # most batches: no tasks to gather
            return await self._apply_chunk(chunks[0])
        alone = len(plain) // MAX_TXN_OPS
        gate = asyncio.Semaphore(CONCURRENT_TXNS)

        async def one(chunk: list[Op]) -> int:
            async with gate:
                return await self._apply_chunk(chunk)

        revisions = await asyncio.gather(*(one(chunk) for chunk in chunks[:alone]))
        for chunk in chunks[alone:]:
            revisions.append(await self._apply_chunk(chunk))
        return max(revisions, default=0)

    async def _apply_chunk(self, chunk: list[Op]) -> int:
        """One transaction; its revision, or 0 when it changed nothing."""
        compare = [_compare_created(op.key, 0) for op in chunk if isinstance(op, Put) and op.create_only]
        success = [_request(op) for op in chunk]
        response = await self._txn(rpc.TxnRequest(compare=compare, success=success))
        if not response.succeeded:
            raise AlreadyExists(", ".join(c.key.decode() for c in compare))
        for op in chunk:
            self._leases.pop(op.key, None)
        return response.header.revision if _changed_anything(chunk, response) else 0

    async def compare_and_put(
        self, key: str, value: str, prev_value: str | None, also: Sequence[Op] = ()
    ) -> int:
        compare = _compare_created(key, 0) if prev_value is None else _compare_value(key, prev_value)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=value.encode()))
        request = rpc.TxnRequest(compare=[compare], success=[put, *(_request(op) for op in also)])
        response = await self._txn(request)
        if not response.succeeded:
            raise AlreadyExists(key) if prev_value is None else CompareFailed(key)
        for written in (key, *(op.key for op in also)):
            self._leases.pop(written, None)
        return response.header.revision

    async def refresh(self, key: str, ttl: float) -> bool:
        lease = self._leases.get(key)
        if lease is None:
            # Someone else's key (or ours before a restart): its lease is in the record.
            response = await self._range(rpc.RangeRequest(key=key.encode()))
            if not response.kvs or not response.kvs[0].lease:
                return False
            lease = self._leases[key] = response.kvs[0].lease

        async def keepalive(c: _Connection) -> Any:
            stream = c.lease.LeaseKeepAlive(
                iter([rpc.LeaseKeepAliveRequest(ID=lease)]), timeout=self._timeout, metadata=c.metadata
            )
            async for reply in stream:
                return reply
            return None

        reply = await self._call(keepalive)
        if reply is None or reply.TTL <= 0:
            self._leases.pop(key, None)
            return False
        return True

    async def delete(self, key: str, *, prev_value: str | None = None, recursive: bool = False) -> bool:
        ops = [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))]
        if recursive:
            directory = (key.rstrip("/") + "/").encode()
            ops.append(
                rpc.RequestOp(
                    request_delete_range=rpc.DeleteRangeRequest(
                        key=directory, range_end=prefix_range_end(directory)
                    )
                )
            )
        compare = [] if prev_value is None else [_compare_value(key, prev_value)]
        response = await self._txn(rpc.TxnRequest(compare=compare, success=ops))
        if not response.succeeded:
            raise CompareFailed(key)
        self._leases.pop(key, None)
        return sum(r.response_delete_range.deleted for r in response.responses) > 0

    # -- watches ----------------------------------------------------------------------------
    async def wait(self, prefix: str, after_index: int, timeout: float) -> int | None:
        return (await self._watch(prefix, after_index, timeout))[0]

    async def changes(self, prefix: str, after_index: int, timeout: float) -> list[Change]:
        first, watch = await self._watch(prefix, after_index, timeout)
        return [] if first is None else watch.changes_after(after_index)

    async def _watch(self, prefix: str, after_index: int, timeout: float) -> tuple[int | None, _PrefixWatch]:
        """The first revision after `after_index` that changed something under `prefix` (None
        after `timeout`), and the watch stream that saw it."""
        self._sweep_watches()
        deadline = time.monotonic() + timeout
        while True:
            watch = self._watches.get(prefix)
            if watch is None or watch.start > after_index + 1 or watch.failed:
                # A stream that opens at a past revision waits for etcd's catch-up pass (every
                # 100 ms); one opened at the next revision and left open delivers at once.
                watch = await self._open_watch(prefix, after_index + 1)
            try:
                first = await watch.first_after(after_index, max(0.0, deadline - time.monotonic()))
            except _LoggedInAgain:
                continue  # on the new stream, from the same revision: nothing missed
            self._lineage.check_usable()  # what a watch delivers now may come from other data
            return first, watch

    async def _open_watch(self, prefix: str, start: int) -> _PrefixWatch:
        """A new watch on `prefix` from `start`, opened to the end even if the caller is cancelled
        meanwhile (as a wait is, when its caller stops waiting): aetcd hands etcd's "created"
        answer to whichever creation is pending on the stream, so a creation abandoned halfway
        gave its watch to the next one, another prefix's, which then never saw its own changes.
        Opened without a caller, the watch is kept for the next wait on that prefix."""
        opening = asyncio.ensure_future(self._opened_watch(prefix, start))
        self._opening.add(opening)
        opening.add_done_callback(self._opening.discard)
        # An error after its caller left is retrieved here, not reported as never retrieved.
        opening.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(opening)

    async def _opened_watch(self, prefix: str, start: int) -> _PrefixWatch:
        old = self._watches.pop(prefix, None)
        if old is not None:
            await old.cancel()
        directory = (prefix.rstrip("/") + "/").encode()
        watch = _PrefixWatch(prefix, start)

        async def create(c: _Connection) -> _PrefixWatch:
            try:
                callback = await c.watcher.add_callback(
                    directory, watch.deliver, range_end=prefix_range_end(directory), start_revision=start
                )
            except aetcd_errors.WatchTimeoutError:
                # etcd's late answer to this creation would go to the next one on this stream,
                # whatever its prefix (aetcd pairs them by order): go on on a new stream.
                await self._drop(c, next_member=False)
                raise
            watch.attach(c, callback.watch_id, self)
            return watch

        try:
            await self._call(create)
        except aetcd_errors.RevisionCompactedError:
            raise HistoryLost(prefix) from None
        self._watches[prefix] = watch
        return watch

    def _sweep_watches(self) -> None:
        now = time.monotonic()
        for prefix, watch in list(self._watches.items()):
            if watch.idle_since is not None and now - watch.idle_since > WATCH_LINGER:
                del self._watches[prefix]
                asyncio.get_running_loop().create_task(watch.cancel())

    async def _stream_broke(self, connection: _Connection, error: BaseException) -> None:
        if isinstance(error, grpc.aio.AioRpcError | aetcd_errors.ClientError):
            self._failed(connection.url, error)
        else:
            self._last_failure = time.monotonic()
        await self._drop(connection, next_member=len(self._targets) > 1)


class _PrefixWatch:
    """One watch stream on a prefix, left open between waits; remembers its recent changes.

    A reader that falls more than KEEP changes behind gets HistoryLost and lists again.
    """

    KEEP = 10_000

    def __init__(self, prefix: str, start: int):
        self.prefix = prefix
        self.start = start  # every event from this revision on has been (or will be) seen
        self.failed: BaseException | None = None
        self.idle_since: float | None = time.monotonic()
        self._changes: collections.deque[Change] = collections.deque(maxlen=self.KEEP)
        self._dropped_through = start - 1  # revisions at or below this are no longer listed
        self._waiters = 0
        self._changed = asyncio.Event()
        self._connection: _Connection | None = None
        self._watch_id: int | None = None
        self._store: EtcdV3Store | None = None

    def attach(self, connection: _Connection, watch_id: int, store: EtcdV3Store) -> None:
        self._connection, self._watch_id, self._store = connection, watch_id, store

    def closed_by_us(self, connection: _Connection) -> None:
        """Its stream is about to be closed for a new login: waiters resume on a new stream."""
        if self._connection is connection and self.failed is None:
            self.failed = _LoggedInAgain()
            self._changed.set()

    async def deliver(self, event_or_error: Any) -> None:
        if isinstance(self.failed, _LoggedInAgain):
            return  # the store closed this stream on purpose; what comes now is its ending
        if event_or_error is None:  # the client shut its watch stream down
            event_or_error = ConnectionError("watch stream closed")
        if isinstance(event_or_error, BaseException):
            self.failed = event_or_error
            if (
                self._store
                and self._connection
                and not isinstance(event_or_error, aetcd_errors.RevisionCompactedError)
            ):
                await self._store._stream_broke(self._connection, event_or_error)
        else:
            if len(self._changes) == self.KEEP:
                self._dropped_through = self._changes[0].index
            kv = event_or_error.kv
            value = None if event_or_error.kind == "DELETE" else kv.value.decode()
            self._changes.append(Change(kv.mod_revision, kv.key.decode(), value))
        self._changed.set()

    def _first_after(self, index: int) -> int | None:
        if self.failed is not None:
            if isinstance(self.failed, aetcd_errors.RevisionCompactedError):
                raise HistoryLost(self.prefix)
            if isinstance(self.failed, _LoggedInAgain):
                raise _LoggedInAgain()
            # The stream broke (etcd restarted, say): an outage; the caller watches again from
            # the same revision on a new stream, so nothing is missed.
            raise Unavailable(f"etcd watch on {self.prefix} broke: {_details(self.failed)}")
        if index < self._dropped_through:
            return self._dropped_through
        first = None
        for change in reversed(self._changes):  # newest first: walk back only over what is new
            if change.index <= index:
                break
            first = change.index
        return first

    def changes_after(self, index: int) -> list[Change]:
        if index < self._dropped_through:
            raise HistoryLost(self.prefix)
        found = []
        for change in reversed(self._changes):
            if change.index <= index:
                break
            found.append(change)
        found.reverse()
        return found

    async def first_after(self, index: int, timeout: float) -> int | None:
        """The first revision after `index` that changed something under the prefix."""
        self._waiters += 1
        self.idle_since = None
        try:
            deadline = time.monotonic() + timeout
            while (found := self._first_after(index)) is None:
                self._changed.clear()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see MemoryStore.wait
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()
            return found
        finally:
            self._waiters -= 1
            if not self._waiters:
                self.idle_since = time.monotonic()

    async def cancel(self) -> None:
        if self._connection is not None and self._watch_id is not None:
            with contextlib.suppress(Exception):
                await self._connection.watcher.cancel(self._watch_id)


def _changed_anything(chunk: Sequence[Op], response: Any) -> bool:
    """Whether a transaction wrote anything (deleting only missing keys makes no revision)."""
    return any(isinstance(op, Put) for op in chunk) or any(
        r.response_delete_range.deleted for r in response.responses
    )


def _request(op: Op) -> rpc.RequestOp:
    if isinstance(op, Put):
        return rpc.RequestOp(request_put=rpc.PutRequest(key=op.key.encode(), value=op.value.encode()))
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key.encode()))


def _compare_created(key: str, revision: int) -> rpc.Compare:
    return rpc.Compare(
        key=key.encode(),
        target=rpc.Compare.CREATE,
        result=rpc.Compare.EQUAL,
        create_revision=revision,
    )


def _compare_value(key: str, value: str) -> rpc.Compare:
    return rpc.Compare(
        key=key.encode(), target=rpc.Compare.VALUE, result=rpc.Compare.EQUAL, value=value.encode()
    )


def _target(url: str) -> tuple[str, str]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"bad etcd server URL {url!r}; expected http://HOST:PORT or https://HOST:PORT")
    return parts.scheme, f"{parts.hostname}:{parts.port or 2379}"


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()


def _code_of(error: grpc.aio.AioRpcError | aetcd_errors.ClientError) -> grpc.StatusCode | None:
    rpc_error = error if isinstance(error, grpc.aio.AioRpcError) else error.__cause__
    if isinstance(rpc_error, grpc.aio.AioRpcError):
        if rpc_error.code() == grpc.StatusCode.UNKNOWN and "deadline exceeded" in (rpc_error.details() or ""):
            # etcd's own timeout on a request it could not commit (a lease keepalive, say).
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return rpc_error.code()
    if isinstance(error, aetcd_errors.ConnectionFailedError | aetcd_errors.ConnectionTimeoutError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, aetcd_errors.WatchTimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, aetcd_errors.UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED
    return None


def _no_leader(error: BaseException | None) -> bool:
    if error is None:
        return False
    rpc_error = error if isinstance(error, grpc.aio.AioRpcError) else error.__cause__
    return isinstance(rpc_error, grpc.aio.AioRpcError) and rpc_error.details() == _NO_LEADER


def _unreachable(urls: list[str], error: BaseException) -> Unavailable:
    return Unavailable(
        f"etcd is unreachable at {', '.join(urls)} ({_details(error)}); "
        "check that etcd runs and --etcd-servers points at it"
    )


def _members(urls: list[str]) -> str:
    return f"the member at {urls[0]}" if len(urls) == 1 else f"the members at {', '.join(urls)}"


def _details(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"
