"""Which S3 failures are worth another attempt, and how long to wait. Pure.

botocore retries a request that fails before its body starts (503 SlowDown, resets on connect), but
not a body that breaks off halfway: those surface while we read, and we retry them ourselves, from
the byte where the body stopped.
"""

from __future__ import annotations

import random
from typing import Optional

RETRYABLE_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                   "Throttling", "ThrottlingException", "RequestLimitExceeded", "503", "500", "502", "504"}


def client_error_retryable(code: str, status: Optional[int]) -> bool:
    return code in RETRYABLE_CODES or (status is not None and status >= 500)


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0, rnd: Optional[random.Random] = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    r = rnd or random
    return r.uniform(0, min(cap, base * (2 ** attempt)))


def is_transient(exc: BaseException) -> bool:
    """Network-level failures while talking to S3 (not local disk errors: those are wrapped first)."""
    import http.client

    import urllib3.exceptions
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return client_error_retryable(str(err.get("Code", "")), status)
    return isinstance(exc, (BotoCoreError, urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError, OSError))
