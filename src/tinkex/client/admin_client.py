"""AdminClient: the organisation's audit log, billing usage and checkpoint storage."""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from ..types import AuditLogResponse, BillingUsageResponse, CurrentCheckpointStorageUsageResponse
from ._futures import APIFuture, sdk_method
from .rest_client import _RestBase


def _rfc3339(value: datetime | str) -> str:
    return value.isoformat() if isinstance(value, datetime) else value


class AdminClient(_RestBase):
    @sdk_method("AdminClient.get_audit_log")
    def get_audit_log(self, event_type: Literal["all", "checkpoints", "projects", "teams", "organizations"] = "all",
                      day: date | None = None) -> APIFuture[AuditLogResponse]:
        return self._future("GET", "/api/v1/audit", model=AuditLogResponse,
                            params={"event_type": event_type, "day": day.isoformat() if day else None})

    @sdk_method("AdminClient.get_audit_log_async")
    async def get_audit_log_async(self, event_type: Literal["all", "checkpoints", "projects", "teams",
                                                            "organizations"] = "all",
                                  day: date | None = None) -> AuditLogResponse:
        return await self.get_audit_log(event_type, day)

    @sdk_method("AdminClient.get_billing_usage")
    def get_billing_usage(self, starting_on: datetime | str, ending_before: datetime | str
                          ) -> APIFuture[BillingUsageResponse]:
        return self._future("GET", "/api/v1/billing/usage/events", model=BillingUsageResponse,
                            params={"starting_on": _rfc3339(starting_on), "ending_before": _rfc3339(ending_before)})

    @sdk_method("AdminClient.get_billing_usage_async")
    async def get_billing_usage_async(self, starting_on: datetime | str, ending_before: datetime | str
                                      ) -> BillingUsageResponse:
        return await self.get_billing_usage(starting_on, ending_before)

    @sdk_method("AdminClient.get_current_checkpoint_storage_usage")
    def get_current_checkpoint_storage_usage(self, project_id: str | None = None
                                             ) -> APIFuture[CurrentCheckpointStorageUsageResponse]:
        return self._future("GET", "/api/v1/billing/usage/checkpoints/current",
                            model=CurrentCheckpointStorageUsageResponse, params={"project_id": project_id})

    @sdk_method("AdminClient.get_current_checkpoint_storage_usage_async")
    async def get_current_checkpoint_storage_usage_async(self, project_id: str | None = None
                                                         ) -> CurrentCheckpointStorageUsageResponse:
        return await self.get_current_checkpoint_storage_usage(project_id)
