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
