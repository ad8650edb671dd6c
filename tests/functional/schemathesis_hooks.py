"""
Schemathesis hooks for ``test_schemathesis`` (loaded through ``SCHEMATHESIS_HOOKS``).

JSON Schema counts ``8080.0`` as an integer, so schemathesis generates it as
valid data; the contract (section 4) says floats are not ports, and the
document says so in words (it cannot in JSON Schema).  Only that one answer,
a 400 Invalid port to a body whose port is a float, is dropped; every other
failure stands.
"""

from __future__ import annotations

from typing import Any

import schemathesis


def _float_port(body: Any) -> bool:
    return isinstance(body, dict) and any(
        isinstance(body.get(key), float) for key in ("container_port", "local_port")
    )


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    if response is None or response.status_code != 400 or not _float_port(case.body):
        return True
    try:
        message = response.json()["error"]["message"]
    except Exception:
        return True
    return bool(message != "Invalid port")
