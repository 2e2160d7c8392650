"""Constants shared across the client: versions, the hosted URL, protocol limits."""

from __future__ import annotations

from importlib import metadata

try:
    TINKEX_VERSION = metadata.version("tinkex")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    TINKEX_VERSION = "0.0.0"

# The version of the official SDK whose wire protocol this client speaks. Servers use it (in
# client/config and create_session) to decide which protocol features the client understands.
PROTOCOL_SDK_VERSION = "0.38.0"

DEFAULT_BASE_URL = "https://tinker.thinkingmachines.dev/services/tinker-prod"
CONSOLE_URL = "https://tinker.thinkingmachines.ai"

HEARTBEAT_INTERVAL_S = 10.0
RETRIEVE_FUTURE_TIMEOUT_S = 45.0
SUBMIT_RETRY_BUDGET_S = 300.0  # the holder wrapper gives up on a submit after 5 minutes
SAMPLER_CLONE_STRIDE = 1_000_000_000
