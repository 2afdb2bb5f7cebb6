"""RemoteLog and LogServer: batches appended by another process's log, over a Unix socket."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import (
    AppendResult,
    AuditEntry,
    AuditUnavailable,
    AuditWriter,
    EncodedEntry,
    LogServer,
    RemoteLog,
    TransparencyLog,
    encode_leaf,
    verify_log,
    verify_tree_head,
)


class _Gated:
    """A log whose appends wait for ``release`` (so requests queue up behind one), and
    which fails the appends while ``failing`` is set."""

    def __init__(self, log: TransparencyLog) -> None:
        self.log = log
        self.release = asyncio.Event()
        self.release.set()
        self.failing = False
        self.sizes: list[int] = []
        self.called_at: list[float] = []

    async def append(self, batch: Sequence[AuditEntry | EncodedEntry]) -> AppendResult:
        self.called_at.append(asyncio.get_running_loop().time())
        await self.release.wait()
        if self.failing:
            raise OSError("disk full")
        self.sizes.append(len(batch))
        return await self.log.append(batch)


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    return str(tmp_path / "log.sock")


@pytest.fixture
async def served(audit_log: TransparencyLog, socket_path: str) -> AsyncIterator[_Gated]:
    gated = _Gated(audit_log)
    server = LogServer(gated, socket_path)
    await server.start()
    try:
        yield gated
    finally:
        await server.stop()


async def _stored_leaves(log: TransparencyLog, size: int) -> list[bytes]:
    return [encode_leaf((await log.get_entry(i)).entry) for i in range(size)]


async def test_batches_of_several_clients_are_appended_in_order_and_verify(
    served: _Gated,
    socket_path: str,
    audit_engine: AsyncEngine,
    signing_key: Ed25519PrivateKey,
    kit: type,
) -> None:
    clients = [RemoteLog(socket_path) for _ in range(3)]
    batches = [[kit.make_entry(10 * c + i) for i in range(c + 2)] for c in range(3)]
    results = await asyncio.gather(*(c.append(b) for c, b in zip(clients, batches, strict=True)))
    for client in clients:
        await client.close()
    # Each client's entries got consecutive leaves of their own, and nobody else's.
    spans = sorted(
        (r.first_index, r.first_index + len(b)) for r, b in zip(results, batches, strict=True)
    )
    assert spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    stored = await _stored_leaves(served.log, spans[-1][1])
    for result, batch in zip(results, batches, strict=True):
        got = stored[result.first_index : result.first_index + len(batch)]
        assert got == [encode_leaf(e) for e in batch]
        # The head returned signs the client's leaves (with the log's key).
        assert result.tree_head.tree_size >= result.first_index + len(batch)
        assert verify_tree_head(result.tree_head, signing_key.public_key())
    report = await verify_log(audit_engine, {kit.key_id: signing_key.public_key()})
    assert report.ok
    assert report.tree_size == 9


async def test_batches_that_arrive_during_a_commit_share_the_next_one(
    served: _Gated, socket_path: str, kit: type
) -> None:
    served.release.clear()
    first = asyncio.ensure_future(RemoteLog(socket_path).append([kit.make_entry(0)]))
    await asyncio.sleep(0.1)  # the first batch is now held inside the log's append
    later = [
        asyncio.ensure_future(RemoteLog(socket_path).append([kit.make_entry(i), kit.make_entry(i)]))
        for i in (1, 2)
    ]
    await asyncio.sleep(0.1)
    served.release.set()
    results = await asyncio.gather(first, *later)
    assert served.sizes == [1, 4]  # one transaction for the two that waited
    assert sorted(r.first_index for r in results) == [0, 1, 3]


async def test_a_failed_commit_fails_its_callers_and_the_next_batch_goes_through(
    served: _Gated, socket_path: str, kit: type
) -> None:
    client = RemoteLog(socket_path)
    served.failing = True
    with pytest.raises(AuditUnavailable, match="did not append"):
        await client.append([kit.make_entry(0)])
    served.failing = False
    result = await client.append([kit.make_entry(1)])
    assert result.first_index == 0  # nothing of the failed batch was kept
    await client.close()


async def test_an_unreachable_server_fails_closed_and_the_client_reconnects(
    audit_log: TransparencyLog, socket_path: str, kit: type
) -> None:
    client = RemoteLog(socket_path, timeout=5)
    with pytest.raises(AuditUnavailable, match="could not be reached"):
        await client.append([kit.make_entry(0)])
    server = LogServer(audit_log, socket_path)
    await server.start()
    assert (await client.append([kit.make_entry(1)])).first_index == 0
    await server.stop()  # e.g. the process restarted: the connection is gone
    with pytest.raises(AuditUnavailable):
        await client.append([kit.make_entry(2)])
    server = LogServer(audit_log, socket_path)
    await server.start()
    try:
        assert (await client.append([kit.make_entry(3)])).first_index == 1
    finally:
        await client.close()
        await server.stop()


async def test_a_server_that_never_answers_times_out(socket_path: str, kit: type) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_unix_server(silent, path=socket_path)
    try:
        with pytest.raises(AuditUnavailable, match="could not be reached"):
            await RemoteLog(socket_path, timeout=0.3).append([kit.make_entry(0)])
    finally:
        server.close()


async def _exchange(path: str, frame: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(frame)
    try:
        return await reader.read()  # the reply, then EOF if the server closes
    finally:
        writer.close()


async def test_what_is_not_a_batch_of_leaves_is_refused_and_changes_nothing(
    served: _Gated, socket_path: str, kit: type
) -> None:
    def frame(body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + body

    reader, writer = await asyncio.open_unix_connection(socket_path)
    for body in (
        b"\xc1",  # not MessagePack
        msgspec.msgpack.encode({"a": 1}),  # not a list of leaves
        msgspec.msgpack.encode([b'{"v": 1}']),  # not a leaf
        msgspec.msgpack.encode([]),  # no entries
    ):
        writer.write(frame(body))
        size = int.from_bytes(await reader.readexactly(4), "big")
        reply = msgspec.msgpack.decode(await reader.readexactly(size))
        assert reply[6] is not None  # the error field
    writer.close()
    # A frame over the limit closes the connection; the server serves on.
    assert await _exchange(socket_path, (2**31).to_bytes(4, "big")) == b""
    assert served.sizes == []
    result = await RemoteLog(socket_path).append([kit.make_entry(0)])
    assert result.first_index == 0


async def test_the_socket_is_for_the_service_user_only(served: _Gated, socket_path: str) -> None:
    mode = os.stat(socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


async def test_the_audit_writer_over_a_remote_log_keeps_its_durability_contract(
    served: _Gated, socket_path: str, audit_log: TransparencyLog, kit: type
) -> None:
    remote = RemoteLog(socket_path)
    async with AuditWriter(remote, max_delay=0.001, early_close=False) as writer:
        indexes = await asyncio.gather(*(writer.append(kit.make_entry(i)) for i in range(40)))
        # Each caller's index holds its own entry once append returns.
        for i, index in enumerate(indexes):
            assert (await audit_log.get_entry(index)).entry == kit.make_entry(i)
        served.failing = True
        with pytest.raises(AuditUnavailable):
            await writer.append(kit.make_entry(99))
    await remote.close()
    assert sorted(indexes) == list(range(40))


async def test_the_server_gathers_for_its_window_and_no_longer(
    audit_log: TransparencyLog, socket_path: str, kit: type
) -> None:
    """With ``max_delay``, batches arriving within the window after the first share its
    transaction; the server hands the batch to the log once the window is out, not a
    second window later. Measured up to the log's append, so a slow disk's commit on a
    loaded machine does not count as gathering."""
    window = 0.5
    gated = _Gated(audit_log)
    server = LogServer(gated, socket_path, max_delay=window)
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        clients = [RemoteLog(socket_path) for _ in range(3)]
        started = loop.time()
        first = asyncio.ensure_future(clients[0].append([kit.make_entry(0)]))
        await asyncio.sleep(window / 4)
        await asyncio.gather(
            first, *(c.append([kit.make_entry(i)]) for i, c in enumerate(clients[1:], 1))
        )
        assert gated.sizes == [3]
        gathered = gated.called_at[0] - started
        assert window * 0.9 <= gathered < window * 2, gathered
        for client in clients:
            await client.close()
    finally:
        await server.stop()
