"""The OpenAPI 3 description of the HTTP API, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "replica-store", "version": "0.1.0"},
    "paths": {},
}
