"""Outgoing mail: ``file://DIR`` writes RFC 5322 ``.eml`` files, ``smtp://host:port`` sends.

The file outbox is the development default; it holds what was sent (the
recipient and a one-time code) the way a mail server's spool would.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["Mailer"]


class Mailer:
    def __init__(self, url: str, *, sender: str = "Story Vault <privacy@storyvault.local>") -> None:
        parsed = urlparse(url)
        self.scheme = parsed.scheme
        self.sender = sender
        if self.scheme == "file":
            self.outbox = Path(parsed.path)
        elif self.scheme == "smtp":
            self.host = parsed.hostname or "127.0.0.1"
            self.port = parsed.port or 25
        else:
            raise ValueError(f"unsupported mail URL scheme {self.scheme!r}")

    def _message(self, to: str, subject: str, body: str) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = to
        msg["Subject"] = subject
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = make_msgid(domain="storyvault.local")
        msg.set_content(body)
        return msg

    async def send(self, to: str, subject: str, body: str) -> None:
        msg = self._message(to, subject, body)
        if self.scheme == "file":
            await asyncio.to_thread(self._write, msg)
        else:
            await asyncio.to_thread(self._smtp, msg)

    def _write(self, msg: EmailMessage) -> None:
        self.outbox.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}.eml"
        tmp = self.outbox / (name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(msg.as_bytes())
        tmp.replace(self.outbox / name)

    def _smtp(self, msg: EmailMessage) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=10) as smtp:
            smtp.send_message(msg)
