"""The in-process benchmark's driver: it must measure the endpoint it names, with the
customer ids it was given, and refuse to report a figure made of error answers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.inprocess import asgi_caller, drive


class _App:
    """An ASGI app that records what it was asked and answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.seen: list[tuple[str, bytes, str | None]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        auth = dict(scope["headers"]).get(b"authorization")
        self.seen.append((scope["path"], scope["query_string"], auth and auth.decode()))
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def test_the_gated_read_is_asked_for_each_customer_with_purpose_and_key() -> None:
    app = _App()
    call = asgi_caller(app, "gated", "svk_k")
    result = asyncio.run(drive(call, ["c1", "c2", "c3"], requests=12, concurrency=4))
    assert result["requests"] == 12
    assert result["cpu_us"] > 0
    paths = {p for p, _, _ in app.seen}
    assert paths == {f"/v1/customers/{c}/story" for c in ("c1", "c2", "c3")}
    assert {q for _, q, _ in app.seen} == {b"purpose=analytics.profiling"}
    assert {a for _, _, a in app.seen} == {"Bearer svk_k"}
    assert len(app.seen) == 12


def test_error_answers_fail_the_measurement() -> None:
    call = asgi_caller(_App(status=503), "bare", "svk_k")
    with pytest.raises(RuntimeError, match="not 200"):
        asyncio.run(drive(call, ["c1"], requests=4, concurrency=2))
