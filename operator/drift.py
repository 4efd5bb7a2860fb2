"""Whether a live child still carries what the operator declared for it."""

from __future__ import annotations

from typing import Any

from kubernetes.utils.quantity import parse_quantity


def drifted(desired: dict[str, Any], live: dict[str, Any] | None) -> bool:
    """True when `live` is gone or a declared field differs. Fields the API server or other controllers
    added (defaults, status, clusterIP, annotations) are not drift."""
    if live is None:
        return True
    return not _contains(live, {k: v for k, v in desired.items() if k != "status"})


def _contains(live: Any, desired: Any) -> bool:
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and _contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(map(_contains, live, desired))
    return live == desired or _same_quantity(live, desired)


def _same_quantity(live: Any, desired: Any) -> bool:
    # The API server stores quantities in canonical form ("1024Mi" comes back as "1Gi").
    if not isinstance(desired, (str, int)) or not isinstance(live, (str, int)) or isinstance(desired, bool):
        return False
    try:
        return parse_quantity(live) == parse_quantity(desired)
    except ValueError:
        return False
