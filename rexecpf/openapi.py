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
                        "409 Container not running, 403 Port not allowed, 403 Port already "
                        "forwarded, 429, 409 Local port unavailable (then 403 Port not allowed "
                        "for a target that is the forward's own local_port)."
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
                        "400": _error("Invalid request, or Invalid port"),
                        "401": _UNAUTHORIZED,
                        "403": _error(
                            "Port already forwarded, or Port not allowed (the target is a "
                            "socket of rexecpf itself)"
                        ),
                        "404": _error("Container not found"),
                        "405": _METHOD,
                        "409": _error("Container not running, or Local port unavailable"),
                        "413": _error("Request too large (over 64 KiB)"),
                        "429": _error("Limit exceeded: forwards_per_container reached"),
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
