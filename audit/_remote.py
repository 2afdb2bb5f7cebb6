"""A transparency log appended to by another process, over a Unix socket.

``LogServer`` serves a ``BatchLog`` (see ``AuditWriter``) on a Unix socket; each
``RemoteLog`` connected to it is a ``BatchLog`` too, whose ``append`` sends a batch's
leaves and returns once the server's log has made them durable. The server appends
every batch that came in while the one before committed in one transaction, so
several processes (a server's workers) that each gather their own batches share
one commit, and never take turns on the log's lock.

The framing is a 4-byte big-endian length and a MessagePack body. A request is the
batch's leaves (their RFC 8785 bytes; the server decodes each, and refuses a batch
holding anything that is not a leaf); a reply is the first leaf index with the tree
head that signs the batch, or an error. A client that cannot reach the server, loses
its connection before the reply, or gets an error raises ``AuditUnavailable``: the
entries may or may not be durable, and the caller fails closed as for any other
failed commit. The socket should be reachable by the service's own user only (it is
created with mode 0600; put it in a private directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import msgspec

from audit._entry import AuditEntry, EncodedEntry, decode_leaf
from audit._errors import AuditUnavailable, InvalidEntry
from audit._log import AppendResult
from audit._tree_head import SignedTreeHead

__all__ = ["LogServer", "RemoteLog"]

_log = logging.getLogger(__name__)

MAX_FRAME = 64 * 1024 * 1024
"""The largest request or reply body accepted (a batch of tens of thousands of leaves)."""

_MAX_MERGED = 4096
"""The most leaves the server appends in one transaction."""


class _BatchLog(Protocol):
    async def append(self, batch: Sequence[AuditEntry | EncodedEntry]) -> AppendResult: ...


class _Reply(msgspec.Struct, array_like=True, frozen=True):
    first_index: int = 0
    tree_size: int = 0
    root_hash: bytes = b""
    timestamp_ms: int = 0
    signature: bytes = b""
    key_id: str = ""
    error: str | None = None
    way: str = ""
    refused: int = 0


_REQUEST = msgspec.msgpack.Encoder()
_DECODE_REQUEST = msgspec.msgpack.Decoder(list[bytes])
_DECODE_REPLY = msgspec.msgpack.Decoder(_Reply)


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes is over the limit")
    return await reader.readexactly(size)


class _Connection:
    """One connection to the server: requests go out as they come, replies come back
    in the same order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._waiting: deque[asyncio.Future[bytes]] = deque()
        self.closed = False
        self._receiver = asyncio.create_task(self._receive(reader), name="audit-log-replies")

    def send(self, request: bytes) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._writer.write(request)
        return future

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                body = await _read_frame(reader)
                future = self._waiting.popleft()
                if not future.done():  # its caller may have given up
                    future.set_result(body)
        except (OSError, EOFError, ValueError, IndexError) as exc:
            self.close(exc)

    def close(self, cause: BaseException | None = None) -> None:
        """Fail every request still waiting for its reply, and close."""
        self.closed = True
        self._writer.close()
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                error = ConnectionError("the connection to the audit log closed")
                error.__cause__ = cause
                future.set_exception(error)
        if self._receiver is not asyncio.current_task():
            self._receiver.cancel()


class RemoteLog:
    """A ``BatchLog`` appended to by a ``LogServer`` at ``path``.

    Batches are sent as they come, without waiting for the ones before them to
    commit (the server appends them in order). The tree head of a batch's reply
    signs the batch's leaves, and may sign later leaves of other clients appended
    in the same transaction. Connects on the first append and again after a
    failure."""

    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self._path = path
        self._timeout = timeout
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()

    async def _connect(self) -> _Connection:
        async with self._connecting:
            if self._connection is None or self._connection.closed:
                reader, writer = await asyncio.open_unix_connection(self._path, limit=MAX_FRAME)
                self._connection = _Connection(reader, writer)
            return self._connection

    async def append(self, batch: Sequence[AuditEntry | EncodedEntry]) -> AppendResult:
        leaves = [EncodedEntry.of(e).leaf for e in batch]
        if not leaves:
            raise ValueError("an append needs at least one entry")
        request = _frame(_REQUEST.encode(leaves))
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self._timeout):
                connection = self._connection
                if connection is None or connection.closed:
                    connection = await self._connect()
                body = await connection.send(request)
        except (OSError, TimeoutError) as exc:
            if connection is not None:
                connection.close(exc)  # a reply late or lost: this stream is done
            raise AuditUnavailable("the audit log's process could not be reached") from exc
        reply = _DECODE_REPLY.decode(body)
        if reply.error is not None:
            raise AuditUnavailable(f"the audit log's process did not append: {reply.error}")
        head = SignedTreeHead(
            reply.tree_size, reply.root_hash, reply.timestamp_ms, reply.signature, reply.key_id
        )
        return AppendResult(reply.first_index, head, reply.way, reply.refused)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


_Request = tuple[list[EncodedEntry], "asyncio.Future[_Reply]"]


class LogServer:
    """Serves ``log`` on a Unix socket at ``path`` for ``RemoteLog`` clients."""

    def __init__(self, log: _BatchLog, path: str, *, max_delay: float = 0.0) -> None:
        if max_delay < 0:
            raise ValueError("max_delay must be >= 0")
        self._log = log
        self._path = path
        self._max_delay = max_delay
        self._first_at = 0.0  # loop time at which the oldest queued batch arrived
        self._queue: list[_Request] = []
        self._arrived = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.batches = 0
        """Transactions committed so far."""

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)  # a socket left by a process that died
        old_mask = os.umask(0o177)  # the socket is created 0600
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=self._path, limit=MAX_FRAME
            )
        finally:
            os.umask(old_mask)
        self._task = asyncio.create_task(self._run(), name="audit-log-server")

    async def stop(self) -> None:
        """Stop accepting batches, append the ones received, close every connection."""
        if self._server is None:
            return
        self._server.close()
        self._stopping = True
        self._arrived.set()
        if self._task is not None:
            await self._task
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read a client's batches as they come; reply to each in order once appended."""
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        replies: asyncio.Queue[asyncio.Future[_Reply] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(writer, replies))
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    body = await _read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client went away
                future: asyncio.Future[_Reply] = loop.create_future()
                replies.put_nowait(future)
                try:
                    entries = [
                        EncodedEntry(decode_leaf(leaf), leaf)
                        for leaf in _DECODE_REQUEST.decode(body)
                    ]
                except (msgspec.DecodeError, InvalidEntry) as exc:
                    _log.warning("audit batch refused: %s", type(exc).__name__)
                    future.set_result(_Reply(error="not a batch of audit leaves"))
                    continue
                if not entries or self._stopping:
                    future.set_result(_Reply(error="stopping" if entries else "no entries"))
                    continue
                if not self._queue:
                    self._first_at = loop.time()
                self._queue.append((entries, future))
                self._arrived.set()
        except ValueError:
            _log.warning("audit client sent an oversized frame; connection closed")
        finally:
            replies.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await sender  # what was received is still appended and answered
            self._clients.discard(task)
            writer.close()

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter, replies: asyncio.Queue[asyncio.Future[_Reply] | None]
    ) -> None:
        while (future := await replies.get()) is not None:
            reply = await future
            if not writer.is_closing():
                writer.write(_frame(msgspec.msgpack.encode(reply)))

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # Gather for up to max_delay after the oldest batch arrived (those that
            # arrived while the transaction before committed have waited already).
            left = self._first_at + self._max_delay - asyncio.get_running_loop().time()
            if left > 0 and not self._stopping:
                await asyncio.sleep(left)
            taken = 0
            requests: list[_Request] = []
            while self._queue and (not requests or taken + len(self._queue[0][0]) <= _MAX_MERGED):
                request = self._queue.pop(0)
                requests.append(request)
                taken += len(request[0])
            self._first_at = asyncio.get_running_loop().time()  # for what is left, if any
            merged = [entry for entries, _ in requests for entry in entries]
            try:
                result = await self._log.append(merged)
            except Exception as exc:  # noqa: BLE001 - any failure: the batch is not durable
                _log.warning(
                    "audit batch of %d entries failed: %s", len(merged), type(exc).__name__
                )
                for _, future in requests:
                    if not future.done():
                        future.set_result(_Reply(error=type(exc).__name__))
                continue
            self.batches += 1
            head = result.tree_head
            first = result.first_index
            for entries, future in requests:
                if not future.done():
                    future.set_result(
                        _Reply(
                            first,
                            head.tree_size,
                            head.root_hash,
                            head.timestamp_ms,
                            head.signature,
                            head.key_id,
                            way=result.way,
                            refused=result.refused,
                        )
                    )
                first += len(entries)
