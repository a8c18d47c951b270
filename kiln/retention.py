"""The bounds of a job's `expires_after` (seconds its outputs and log lines are kept), in a
module without pydantic: the server's schemas and the light `kiln` CLI share them."""

from __future__ import annotations

#: A minute to ten years.
MIN_EXPIRES_AFTER_S = 60
MAX_EXPIRES_AFTER_S = 3650 * 86400
