"""
The OpenAPI 3.1 document served at ``/api/openapi.json``.

Tests validate live responses against the schemas here, so the document and
the code cannot drift apart unnoticed.
"""

from __future__ import annotations

from typing import Any

from rexecpf import __version__

__all__ = ["openapi_document"]


def _error(description: str, extra_headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if extra_headers:
        response["headers"] = extra_headers
    return response


_UNAUTHORIZED = _error(
    "Unauthorized: no or bad token",
    {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
)
_METHOD = _error(
    "Method not allowed", {"Allow": {"schema": {"type": "string"}, "description": "allowed methods"}}
)
_UNAVAILABLE = _error("Backend unavailable (or Store unavailable): nothing was changed")

#: JSON Schema counts 8080.0 as an integer; the API does not (contract section 4).
_INTEGER_LITERAL = (
    "A JSON integer literal: 8080.0 (a float, though JSON Schema calls it an integer) "
    "and booleans are refused with 400 Invalid port."
)

_HOST_NAME_PATTERN = r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
#: What the API takes as a domain: a host name as above in any case, with one
#: trailing dot or none, whose last label is not all digits (not an IP address).
_HOST_NAME_INPUT_PATTERN = (
    r"^(?=.{1,253}\.?$)(?!.*\.[0-9]+\.?$)"
    r"([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$"
)
_SLUG_PATTERN = r"^(?!.*--)[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"

_CONTAINER_ID = {
    "name": "containerId",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
    "description": "Container id (the Docker backend also takes a short id or a name)",
}
_FORWARD_ID = {
    "name": "forwardId",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}
_DOMAIN = {
    "name": "domain",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": _HOST_NAME_INPUT_PATTERN},
    "description": "a host name (RFC 1123), compared in lowercase, one trailing dot ignored",
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_DOMAIN_REF = {"$ref": "#/components/schemas/Domain"}


def openapi_document() -> dict[str, Any]:
    """:return: the OpenAPI 3.1 document, as a fresh dict."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rexecpf port forwarding API",
            "version": __version__,
            "description": (
                "Expose container ports through an authenticated HTTP proxy (/p/{id}/), "
                "a binary WebSocket tunnel (/ws/port-forward/{id}) and local ports."
            ),
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/containers/{containerId}/port-forwards": {
                "parameters": [_CONTAINER_ID],
                "post": {
                    "operationId": "createPortForward",
                    "summary": "Create a port forward",
                    "description": (
                        "The body is read as JSON whatever its Content-Type. Errors are checked "
                        "in this order: 401, 404, 400 Invalid request, 400 Invalid port, "
                        "400 Invalid domain, 400 Invalid slug, 403 Custom domains not allowed "
                        "(checked before 400 Invalid domain for a name of the service itself), "
                        "429 Too many domains, 400 Invalid slug (no proxy_domain, or a user "
                        "name that cannot be part of a host), "
                        "409 Container not running, 403 Port not allowed, 403 Port already "
                        "forwarded, 429 Limit exceeded, 409 Local port unavailable (then 403 "
                        "Port not allowed for a target that is the forward's own local_port), "
                        "409 Slug already in use, 409 Domain already claimed."
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/CreatePortForward"}
                            }
                        },
                    },
                    "responses": {
                        "201": {
                            "description": "Created",
                            "headers": {
                                "Location": {
                                    "schema": {"type": "string"},
                                    "description": "the new forward's URL",
                                }
                            },
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/PortForward"}
                                }
                            },
                            "links": {
                                "GetPortForward": {
                                    "operationId": "getPortForward",
                                    "parameters": {
                                        "containerId": "$request.path.containerId",
                                        "forwardId": "$response.body#/id",
                                    },
                                },
                                "DeletePortForward": {
                                    "operationId": "deletePortForward",
                                    "parameters": {
                                        "containerId": "$request.path.containerId",
                                        "forwardId": "$response.body#/id",
                                    },
                                },
                            },
                        },
                        "400": _error("Invalid request, Invalid port, Invalid domain or Invalid slug"),
                        "401": _UNAUTHORIZED,
                        "403": _error(
                            "Port already forwarded, Port not allowed (the target is a "
                            "socket of rexecpf itself), or Custom domains not allowed"
                        ),
                        "404": _error("Container not found"),
                        "405": _METHOD,
                        "409": _error(
                            "Container not running, Local port unavailable, Slug already in use, "
                            "or Domain already claimed"
                        ),
                        "413": _error("Request too large (over 64 KiB)"),
                        "429": _error(
                            "Limit exceeded (forwards_per_container reached), or Too many domains"
                        ),
                        "503": _UNAVAILABLE,
                    },
                },
                "get": {
                    "operationId": "listPortForwards",
                    "summary": "List a container's port forwards, oldest first",
                    "responses": {
                        "200": {
                            "description": "The forwards",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/PortForward"},
                                    }
                                }
                            },
                        },
                        "401": _UNAUTHORIZED,
                        "404": _error("Container not found"),
                        "405": _METHOD,
                        "503": _UNAVAILABLE,
                    },
                },
            },
            "/api/containers/{containerId}/port-forwards/{forwardId}": {
                "parameters": [_CONTAINER_ID, _FORWARD_ID],
                "get": {
                    "operationId": "getPortForward",
                    "summary": "Get one port forward",
                    "responses": {
                        "200": {
                            "description": "The forward",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/PortForward"}
                                }
                            },
                        },
                        "401": _UNAUTHORIZED,
                        "404": _error("Container not found, or Port forward not found"),
                        "405": _METHOD,
                        "503": _UNAVAILABLE,
                    },
                },
                "delete": {
                    "operationId": "deletePortForward",
                    "summary": "Delete a port forward; its listener, proxied connections and "
                    "tunnels are closed at once",
                    "responses": {
                        "204": {"description": "Deleted"},
                        "401": _UNAUTHORIZED,
                        "404": _error("Container not found, or Port forward not found"),
                        "405": _METHOD,
                        "503": _UNAVAILABLE,
                    },
                },
            },
            "/api/containers/{containerId}/port-forwards/{forwardId}/domains": {
                "parameters": [_CONTAINER_ID, _FORWARD_ID],
                "get": {
                    "operationId": "listDomains",
                    "summary": "A forward's custom domains, in the order they were added",
                    "responses": {
                        "200": _json({"type": "array", "items": _DOMAIN_REF}, "The domains"),
                        "401": _UNAUTHORIZED,
                        "404": _error("Container not found, or Port forward not found"),
                        "405": _METHOD,
                        "503": _UNAVAILABLE,
                    },
                },
            },
            "/api/containers/{containerId}/port-forwards/{forwardId}/domains/{domain}": {
                "parameters": [_CONTAINER_ID, _FORWARD_ID, _DOMAIN],
                "put": {
                    "operationId": "putDomain",
                    "summary": "Give the forward a custom domain, or check its TXT record again",
                    "description": (
                        "Idempotent; no body is needed (one is ignored). The domain is verified "
                        "once the DNS TXT record verification.name holds verification.value "
                        "(at once when the server does not verify); only a verified domain is "
                        "routed and claimed. PUT again to re-check. Errors in this order: 401, "
                        "404, 403 Custom domains not allowed, 400 Invalid domain, 429 Too many "
                        "domains, 409 Domain already claimed."
                    ),
                    "responses": {
                        "200": _json(_DOMAIN_REF, "The forward already had it (its proof re-checked)"),
                        "201": {
                            **_json(_DOMAIN_REF, "Added"),
                            "headers": {
                                "Location": {"schema": {"type": "string"}, "description": "the domain's URL"}
                            },
                        },
                        "400": _error("Invalid domain: not a host name, or a name of the service itself"),
                        "401": _UNAUTHORIZED,
                        "403": _error("Custom domains not allowed for this user"),
                        "404": _error("Container not found, or Port forward not found"),
                        "405": _METHOD,
                        "409": _error("Domain already claimed (by another forward)"),
                        "429": _error("Too many domains on this forward"),
                        "503": _UNAVAILABLE,
                    },
                },
                "get": {
                    "operationId": "getDomain",
                    "summary": "One custom domain of the forward",
                    "responses": {
                        "200": _json(_DOMAIN_REF, "The domain"),
                        "401": _UNAUTHORIZED,
                        "404": _error("Container not found, Port forward not found, or Domain not found"),
                        "405": _METHOD,
                        "503": _UNAVAILABLE,
                    },
                },
                "delete": {
                    "operationId": "deleteDomain",
                    "summary": "Take the custom domain from the forward: no longer routed, free to claim",
                    "responses": {
                        "204": {"description": "Removed"},
                        "401": _UNAUTHORIZED,
                        "404": _error("Container not found, Port forward not found, or Domain not found"),
                        "405": _METHOD,
                        "503": _UNAVAILABLE,
                    },
                },
            },
            "/api/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Whether the store and the backend answer",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Healthy",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/Health"}}
                            },
                        },
                        "503": {
                            "description": "The store or the backend does not answer",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/Health"}}
                            },
                        },
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "CreatePortForward": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["container_port"],
                    "properties": {
                        "container_port": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 65535,
                            "description": _INTEGER_LITERAL,
                        },
                        "local_port": {
                            "type": ["integer", "null"],
                            "minimum": 1,
                            "maximum": 65535,
                            "description": "auto-assigned from local_ports when omitted. "
                            + _INTEGER_LITERAL,
                        },
                        "name": {"type": ["string", "null"], "minLength": 1, "maxLength": 100},
                        "pass_preflight": {
                            "type": "boolean",
                            "default": False,
                            "description": "pass CORS preflights (OPTIONS with "
                            "Access-Control-Request-Method and no credentials) to the container, "
                            "without credentials; otherwise the proxy answers them 204 with no "
                            "Access-Control-Allow-* header",
                        },
                        "domains": {
                            "type": "array",
                            "maxItems": 100,
                            "uniqueItems": True,
                            "items": {"type": "string", "pattern": _HOST_NAME_INPUT_PATTERN},
                            "description": "custom domains (host names; needs auth.custom_domains); "
                            "more than [domains] per_forward is 429",
                        },
                        "slug": {
                            "type": ["string", "null"],
                            "pattern": _SLUG_PATTERN,
                            "description": "a stable name, unique per user: proxy_url becomes "
                            "{slug}--{user}.{proxy_domain}, and the next forward given the same "
                            "slug (after a container restart) takes that host over",
                        },
                    },
                },
                "Domain": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["domain", "verified", "url", "verification"],
                    "properties": {
                        "domain": {"type": "string", "pattern": _HOST_NAME_PATTERN},
                        "verified": {
                            "type": "boolean",
                            "description": "proven (or not checked by this server): routed and claimed",
                        },
                        "url": {"type": "string", "format": "uri"},
                        "verification": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["type", "name", "value"],
                            "properties": {
                                "type": {"const": "TXT"},
                                "name": {"type": "string", "pattern": r"^_rexecpf\."},
                                "value": {"type": "string", "pattern": "^[a-z2-7]{32}$"},
                            },
                        },
                    },
                },
                "PortForward": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": [
                        "id",
                        "container_id",
                        "container_port",
                        "local_port",
                        "name",
                        "proxy_url",
                        "websocket_url",
                        "created_at",
                        "pass_preflight",
                        "slug",
                        "domains",
                    ],
                    "properties": {
                        "id": {"type": "string", "pattern": "^pf_[a-z0-9]{20,}$"},
                        "container_id": {"type": "string"},
                        "container_port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "local_port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "name": {"type": ["string", "null"]},
                        "proxy_url": {"type": "string", "format": "uri"},
                        "websocket_url": {"type": "string", "pattern": "^wss?://"},
                        "pass_preflight": {"type": "boolean"},
                        "slug": {"type": ["string", "null"], "pattern": _SLUG_PATTERN},
                        "domains": {"type": "array", "items": _DOMAIN_REF},
                        "created_at": {
                            "type": "string",
                            "format": "date-time",
                            "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$",
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["code", "message", "detail"],
                            "properties": {
                                "code": {"type": "integer"},
                                "message": {"type": "string"},
                                "detail": {"type": "string"},
                            },
                        }
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ok", "unavailable"]},
                        "detail": {"type": "string"},
                    },
                },
            },
        },
    }
