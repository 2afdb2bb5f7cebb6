"""Operations: liveness and readiness."""

from __future__ import annotations

from typing import Any

from litestar import get
from litestar.response import Response

from api.deps import VaultDep
from api.problems import problem
from governance.errors import Unavailable


@get("/health", operation_id="health", tags=["operations"], sync_to_thread=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", operation_id="ready", tags=["operations"])
async def ready(vault: VaultDep) -> Response[dict[str, Any]]:
    try:
        checks = await vault.ready()
    except Unavailable as exc:
        # which part is unusable (database, key store, key ring, audit writer); no detail
        return problem(503, "not_ready", f"not ready: {exc}", extra={"component": exc.code})
    except Exception as exc:  # noqa: BLE001  (any failure means not ready; its type is the answer)
        return problem(503, "not_ready", f"not ready: {type(exc).__name__}")
    return Response({"status": "ready", **checks})
