"""The typed errors of the SDK, with the same names and hierarchy as the official `tinker` SDK.

TinkerError
├── APIError
│   ├── APIStatusError (one subclass per status family)
│   ├── APIConnectionError
│   │   └── APITimeoutError
│   └── APIResponseValidationError
└── RequestFailedError (an asynchronous request that finished as failed)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import httpx


class RequestErrorCategory(StrEnum):
    """Who is to blame for a failed request; the wire values are lowercase."""

    Unknown = "unknown"
    Server = "server"
    User = "user"


class TinkerError(Exception):
    """The root of every error raised on purpose by the SDK."""


class APIError(TinkerError):
    """An HTTP exchange with the server went wrong."""

    message: str
    request: httpx.Request
    body: object | None
    code: str | None = None
    param: str | None = None
    type: str | None = None

    def __init__(self, message: str, request: httpx.Request, *, body: object | None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body
        if isinstance(body, dict):
            self.code = body.get("code")
            self.param = body.get("param")
            self.type = body.get("type")


class APIResponseValidationError(APIError):
    """The server answered with a body that does not fit the expected shape."""

    def __init__(self, response: httpx.Response, body: object | None, message: str | None = None) -> None:
        super().__init__(message or "Data returned by API invalid for expected schema.", response.request, body=body)
        self.response = response
        self.status_code = response.status_code

    def __reduce__(self) -> Any:
        return (self.__class__, (self.response, self.body, self.message))


class APIStatusError(APIError):
    """The server answered with a 4xx or 5xx status."""

    def __init__(self, message: str, response: httpx.Response, body: object | None) -> None:
        super().__init__(message, response.request, body=body)
        self.response = response
        self.status_code = response.status_code
        self.request_id = response.headers.get("x-request-id")

    def __reduce__(self) -> Any:
        return (self.__class__, (self.message, self.response, self.body))


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke."""

    def __init__(self, request: httpx.Request, message: str = "Connection error.") -> None:
        super().__init__(message, request, body=None)

    def __reduce__(self) -> Any:
        return (self.__class__, (self.request, self.message))


class APITimeoutError(APIConnectionError):
    def __init__(self, request: httpx.Request) -> None:
        super().__init__(request, "Request timed out.")

    def __reduce__(self) -> Any:
        return (self.__class__, (self.request,))


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class BillingError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class ConflictError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: BillingError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error_class(status_code: int) -> type[APIStatusError]:
    """The APIStatusError subclass for an HTTP status."""
    if status_code >= 500:
        return InternalServerError
    return _STATUS_ERRORS.get(status_code, APIStatusError)


class RequestFailedError(TinkerError):
    """An asynchronous request that the server accepted and then finished as failed."""

    def __init__(self, message: str, request_id: str, category: RequestErrorCategory | str) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        try:
            self.category = RequestErrorCategory(category)
        except ValueError:
            self.category = RequestErrorCategory.Unknown

    def __reduce__(self) -> Any:
        return (self.__class__, (self.message, self.request_id, self.category))
