"""The hand-written OpenAPI 3.1 description of the REST API, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

_MONEY = {
    "type": "object",
    "required": ["minor", "currency"],
    "properties": {"minor": {"type": "integer"}, "currency": {"type": "string"}},
}
_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
}


def _op(
    summary: str,
    roles: str | None = "any role",
    body: dict[str, Any] | None = None,
    params: list[str] | None = None,
    ok: str = "200",
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            ok: {"description": "success"},
            "400": {"description": "invalid request", "content": _content(_ERROR)},
            "401": {"description": "no or unknown API key"},
            "403": {"description": "the key's role may not do this"},
            "409": {"description": "refused by a business rule (error = reason code)"},
        },
    }
    if roles is not None:
        op["security"] = [{"apiKey": []}]
        op["description"] = f"Roles: {roles}."
    if body is not None:
        op["requestBody"] = {"required": True, "content": _content(body)}
    if params:
        op["parameters"] = [
            {
                "name": p,
                "in": "path" if p.endswith("_id") and "{" in p else "query",
                "schema": {"type": "string"},
            }
            for p in params
        ]
    return op


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props}


_ADMIN = "owner, manager"
_PATH_TERMINAL = [
    {"name": "terminal_id", "in": "path", "required": True, "schema": {"type": "string"}}
]
_PATH_PAYMENT = [
    {"name": "payment_id", "in": "path", "required": True, "schema": {"type": "string"}}
]
_PATH_REFUND = {"name": "refund_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _with(op: dict[str, Any], params: list[dict[str, Any]]) -> dict[str, Any]:
    op["parameters"] = params + op.get("parameters", [])
    return op


_NOTE = {"type": "string", "maxLength": 512}


def _strict(**props: Any) -> dict[str, Any]:
    """An object of exactly these properties; all but ``note`` required."""
    return {
        "type": "object",
        "properties": props,
        "required": [name for name in props if name != "note"],
        "additionalProperties": False,
    }


def _resolve_op(
    op: dict[str, Any],
    answer: str = "the payment, as GET /v1/payments/{payment_id}",
    missing: str = "no such payment in your account",
) -> dict[str, Any]:
    op["responses"]["200"]["description"] = answer
    op["responses"]["404"] = {"description": missing}
    return op


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "syncengine sync server",
        "version": "1",
        "description": "REST API of the offline-first payment sync server. The terminal sync "
        "protocol is a websocket at /sync (docs/protocol.md).",
    },
    "components": {
        "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Money": _MONEY, "Error": _ERROR},
    },
    "paths": {
        "/health": {
            "get": _op(
                "Liveness, schema version, and whether the forwarder is stuck (degraded)",
                roles=None,
            )
        },
        "/metrics": {"get": _op("Prometheus text metrics", roles=None)},
        "/v1/enroll": {
            "post": _op(
                "Enroll a terminal with a one-time code and its Ed25519 public key",
                roles=None,
                body=_obj(
                    terminal_id={"type": "string"},
                    code={"type": "string"},
                    public_key={"type": "string", "description": "base64url raw Ed25519 key"},
                    device_class={"enum": ["reader", "stand", "register", "terminal"]},
                ),
                ok="201",
            )
        },
        "/v1/enrollment-codes": {
            "post": _op(
                "Create a one-time enrollment code",
                _ADMIN,
                _obj(terminal_id={"type": "string"}, device_class={"type": "string"}),
                ok="201",
            )
        },
        "/v1/api-keys": {
            "post": _op(
                "Create an API key with a role (the secret is shown once; at most 500 live)",
                "owner",
                _obj(
                    role={"enum": ["owner", "manager", "cashier"]},
                    name={"type": "string", "maxLength": 64},
                ),
                ok="201",
            ),
            "get": _op(
                "The account's API keys, no secrets: live ones oldest first, then revoked",
                "owner",
            ),
        },
        "/v1/api-keys/{key_id}": {
            "delete": _resolve_op(
                _with(
                    _op(
                        "Revoke an API key at once (audited); the last live owner key is kept "
                        "(409 last_owner_key)",
                        "owner",
                    ),
                    [
                        {
                            "name": "key_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                ),
                answer="the key id and when it was revoked",
                missing="no such API key in your account",
            )
        },
        "/v1/merchant": {
            "get": _op("Merchant settings and offline liability acceptance"),
            "patch": _op(
                "Change time zone, batch close time, standalone mode",
                _ADMIN,
                _obj(
                    timezone={"type": "string"},
                    batch_close_local={"type": "string", "example": "23:00"},
                    standalone_allowed={"type": "boolean"},
                ),
            ),
        },
        "/v1/merchant/offline-liability": {
            "post": _op(
                "Accept liability for declined/expired offline payments and chargebacks (R2)",
                _ADMIN,
                _obj(accept={"const": True}),
            )
        },
        "/v1/merchant/offline-budget": {
            "get": _op("The merchant-wide offline budget and each terminal's share (escrow)"),
            "put": _op(
                "Set or remove (null) the merchant-wide offline budget; grants follow at once",
                _ADMIN,
                _obj(offline_budget={"type": ["object", "null"]}),
            ),
        },
        "/v1/maintenance": {
            "get": _op("Whether /sync is in maintenance (service_unavailable)"),
            "put": _op(
                "Switch maintenance: /sync answers service_unavailable (a provider outage)",
                "owner",
                _obj(maintenance={"type": "boolean"}),
            ),
        },
        "/v1/terminals": {
            "get": _op(
                "Enrolled terminals with mode and pending forwards, by id (paged: ``next`` is "
                "the ``after`` of the next page, null on the last)",
                params=["limit", "after"],
            )
        },
        "/v1/terminals/{terminal_id}": {
            "delete": _with(
                _op(
                    "Revoke a terminal (lost, stolen, out of use): its sessions end, it can no "
                    "longer connect or push; audited (404 not in your account, 409 "
                    "already_revoked)",
                    _ADMIN,
                ),
                _PATH_TERMINAL,
            )
        },
        "/v1/terminals/{terminal_id}/settings": {
            "get": _with(_op("A terminal's offline settings"), _PATH_TERMINAL),
            "put": _with(
                _op(
                    "Change offline mode, limits, entry policy (partial update)",
                    _ADMIN,
                    _obj(
                        offline_allowed={"type": "boolean"},
                        per_transaction_limit=_MONEY,
                        total_limit=_MONEY,
                        offline_entry_policy={"enum": ["prompt", "auto"]},
                        offline_auto_delay_ms={"type": "integer"},
                        force_offline={
                            "type": "boolean",
                            "description": "true forces the terminal offline; every press "
                            "is sent, also when already true (a terminal whose link came "
                            "back left forced offline and takes the new press)",
                        },
                    ),
                ),
                _PATH_TERMINAL,
            ),
        },
        "/v1/terminals/{terminal_id}/z-report": {
            "get": _with(_op("Totals since the last Z reset (X report)"), _PATH_TERMINAL),
            "post": _with(_op("Close the period: Z report with reset", ok="201"), _PATH_TERMINAL),
        },
        "/v1/payments": {
            "get": _op(
                "Payments view",
                params=[
                    "channel",
                    "status",
                    "payout_status",
                    "terminal_id",
                    "from_ms",
                    "to_ms",
                    "limit",
                    "after",
                    "forwarding",
                    "batch_id",
                ],
            )
        },
        "/v1/payments/{payment_id}": {"get": _with(_op("One payment"), _PATH_PAYMENT)},
        "/v1/payments/{payment_id}/refunds": {
            "get": _with(_op("Refunds of a payment"), _PATH_PAYMENT),
            "post": _with(
                _op(
                    "Refund all or part of a processed payment (R9)",
                    body=_obj(
                        amount=_MONEY,
                        refund_id={"type": "string"},
                        method={"enum": ["original_payment", "card_present"]},
                        card_present={"type": "boolean"},
                    ),
                    ok="201",
                ),
                _PATH_PAYMENT,
            ),
        },
        "/v1/payments/{payment_id}/dispute": {
            "post": _with(
                _op("Open or close a chargeback dispute", _ADMIN, _obj(open={"type": "boolean"})),
                _PATH_PAYMENT,
            )
        },
        "/v1/payments/{payment_id}/resolve": {
            "post": _with(
                _resolve_op(
                    _op(
                        "Resolve a parked payment: retry under the same idempotency key, or "
                        "finalize it as approved/declined from the processor's own record "
                        "(audited; 409 not_parked unless it is parked)",
                        _ADMIN,
                        {
                            "oneOf": [
                                _strict(action={"const": "retry"}, note=_NOTE),
                                _strict(
                                    action={"const": "approved"},
                                    processor_ref={
                                        "type": "string",
                                        "minLength": 1,
                                        "maxLength": 64,
                                    },
                                    note=_NOTE,
                                ),
                                _strict(
                                    action={"const": "declined"},
                                    code={"type": "string", "minLength": 1, "maxLength": 32},
                                    note=_NOTE,
                                ),
                            ]
                        },
                    )
                ),
                _PATH_PAYMENT,
            )
        },
        "/v1/payments/{payment_id}/refunds/{refund_id}/resolve": {
            "post": _with(
                _resolve_op(
                    _op(
                        "Resolve a parked refund (the processor holds another request under "
                        "its id): retry under the same id, or finish it as done/refused from "
                        "the processor's own record (audited; 409 not_parked unless parked)",
                        _ADMIN,
                        {
                            "oneOf": [
                                _strict(action={"const": action}, note=_NOTE)
                                for action in ("retry", "done", "refused")
                            ]
                        },
                    ),
                    answer="the refund, as GET .../refunds lists it",
                    missing="no such payment or refund in your account",
                ),
                [*_PATH_PAYMENT, _PATH_REFUND],
            )
        },
        "/v1/refunds": {
            "get": _op(
                "The merchant's refunds in one state (state=parked: they need a person; "
                "state=pending: waiting for the processor), oldest first",
                params=["state", "limit"],
            )
        },
        "/v1/batches": {"get": _op("Settlement batches, newest first", params=["limit"])},
        "/v1/batches/close": {"post": _op("Close every batch whose close time has passed", _ADMIN)},
        "/v1/batches/{batch_id}": {
            "get": _with(
                _op(
                    "One batch with its payments by id (paged: at most ``limit``, 1,000 by "
                    "default; ``next`` is the ``after`` of the next page, null on the last)",
                    params=["limit", "after"],
                ),
                [
                    {
                        "name": "batch_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer"},
                    }
                ],
            )
        },
        "/v1/reports/reconciliation": {
            "get": _op(
                "Why a day's batch total differs from its sales total, payment by payment",
                params=["day"],
            )
        },
    },
}
