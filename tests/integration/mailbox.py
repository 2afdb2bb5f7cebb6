"""Reading sign-in codes from the file outbox (RFC 5322 .eml files)."""

from __future__ import annotations

import re
from email import policy
from email.parser import BytesParser
from pathlib import Path


def messages(outbox: Path) -> list[dict[str, str]]:
    found = []
    for path in sorted(outbox.glob("*.eml")) if outbox.exists() else []:
        msg = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        body = msg.get_body(preferencelist=("plain",))
        found.append(
            {
                "to": str(msg["To"]),
                "subject": str(msg["Subject"]),
                "body": body.get_content() if body else "",
            }
        )
    return found


def code_for(outbox: Path, email: str) -> str:
    mine = [m for m in messages(outbox) if m["to"] == email]
    assert mine, "no mail for that address"
    match = re.search(r"\b(\d{6,8})\b", mine[-1]["body"])
    assert match
    return match.group(1)


async def sign_in(client: object, outbox: Path, email: str) -> dict[str, str]:
    """Sign a customer in through the real flow (login, code from the outbox, verify)."""
    resp = await client.post("/v1/me/login", json={"email": email})  # type: ignore[attr-defined]
    assert resp.status_code == 202
    code = code_for(outbox, email)
    resp = await client.post("/v1/me/verify", json={"email": email, "code": code})  # type: ignore[attr-defined]
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}
