"""Helpers for the account tests: a real SMTP server (aiosmtpd) and sign-up/sign-in over HTTP."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import httpx
from aiosmtpd.controller import Controller

from shared.auth import Principal, sign_internal
from shared.settings import Settings
from tests.conftest import eventually, free_port

PASSWORD = "correct horse battery staple"


@dataclass
class SmtpSink:
    """A real SMTP server on 127.0.0.1 keeping every message it receives."""

    port: int = field(default_factory=free_port)
    messages: list[EmailMessage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        return "250 OK"

    async def wait_for(self, to: str, subject_part: str, timeout: float = 15.0) -> EmailMessage:
        async def found() -> EmailMessage | None:
            for message in self.messages:
                if message["To"] == to and subject_part in message["Subject"]:
                    return message
            return None

        result: EmailMessage = await eventually(found, timeout=timeout)
        return result


def body_text(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    content: str = part.get_content()
    return content


def reset_link(message: EmailMessage) -> str:
    match = re.search(r"https?://\S+/reset-password#token=[A-Za-z0-9_-]+", body_text(message))
    assert match, body_text(message)
    return match.group(0)


async def register(client: httpx.AsyncClient, email_address: str, password: str = PASSWORD) -> dict[str, Any]:
    response = await client.post("/api/v1/auth/register", json={"email": email_address, "password": password})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def login(
    client: httpx.AsyncClient, email_address: str, password: str = PASSWORD, **kwargs: Any
) -> httpx.Response:
    return await client.post("/api/v1/auth/login", data={"username": email_address, "password": password}, **kwargs)


async def tokens(client: httpx.AsyncClient, email_address: str, password: str = PASSWORD) -> dict[str, Any]:
    response = await login(client, email_address, password)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def settle() -> None:
    """Lets background work scheduled after a response (activity rows, reset mails) run."""
    await asyncio.sleep(0.05)


class InternalCredential(httpx.Auth):
    """Signs each request the way the gateway does, for tests that call a service directly."""

    requires_request_body = True

    def __init__(self, settings: Settings, principal: Principal | None = None) -> None:
        self.key = settings.purpose_key("internal")
        self.principal = principal or Principal(user_id=str(uuid.uuid4()), role="admin")

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(
            sign_internal(
                self.key,
                request.method,
                request.url.path,
                self.principal,
                query=request.url.query.decode("latin-1"),
                body=request.content,
            )
        )
        yield request
