"""Credential helpers (no network except `raise_if_tinker_not_accessible`)."""

from __future__ import annotations

from ._config import find_credential
from ._futures import run_in_sdk_loop


def get_tinker_token() -> str | None:
    """The static credential that would be used (argument-free resolution), or None."""
    return find_credential()


def tinker_has_credentials() -> bool:
    return find_credential() is not None


def raise_if_tinker_not_accessible(base_url: str | None = None, api_key: str | None = None) -> None:
    """One unretried GET of the server capabilities; raises the typed error when it fails."""
    from ._config import resolve
    from ._transport import Transport

    connection = resolve(base_url, api_key)

    async def check() -> None:
        transport = Transport(connection.base_url, connection.api_key)
        try:
            await transport.request("GET", "/api/v1/get_server_capabilities", purpose="rest", max_retries=0)
        finally:
            await transport.aclose()

    run_in_sdk_loop(check()).result()
