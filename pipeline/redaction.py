"""Redaction: secrets never reach a store. Values under secret-looking keys, credentials inside URLs and
access-key-shaped strings become ``***`` before anything is logged to MLflow or written into a checkpoint.

Its own module so that checkpointing, reporting and tracking share it without importing each other (or MLflow).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

REDACTED = "***"
_SECRET_KEY = re.compile(
    r"(secret|token|passw(or)?d|pwd|api[_-]?key|access[_-]?key|credential|private[_-]?key|auth)", re.IGNORECASE
)
_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]+)@", re.IGNORECASE
)
_SECRET_VALUE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bsk-[A-Za-z0-9_-]{20,}\b")


def redact_value(key: str, value: Any) -> Any:
    """``value`` with anything secret-looking replaced by ``***`` (by key name, URL password, key shape)."""
    if value is None:
        return None
    if _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
        return REDACTED
    if isinstance(value, str):
        value = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
        return _SECRET_VALUE.sub(REDACTED, value)
    return value


def redact(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """Redact every value of a flat or nested mapping (nested keys are checked by their own name)."""
    out = {}
    for key, value in mapping.items():
        out[key] = redact(value) if isinstance(value, Mapping) else redact_value(str(key), value)
    return out
