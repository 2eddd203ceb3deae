"""Checks recorded HTTP exchanges against the published REST API specs (the tables in ``tests/contracts/``).

An exchange passes when its operation (method + path) is declared, every query parameter it sends is declared,
its request body fits the declared body schema, its response status is declared (a non-2xx status may fall
under ``default``), and its response body fits that status's schema. A body "fits" when every declared type,
enum and required field holds and it carries no field the schema does not declare: a schema that declares
properties is closed (the spec describes the whole object) unless it names a type for additional properties; a
schema that declares none is a free-form object (a twin's properties, a registration payload).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTRACTS = Path(__file__).resolve().parent / "contracts"
# Which table describes which emulated server (by the server's name in ``emulators.stack``).
_KEY_VAULT = ("keyvault-keys.json", "keyvault-secrets.json")
SERVERS = {"keyvault": _KEY_VAULT, "rootvault": _KEY_VAULT,  # the intermediates' vault and the root key's vault
           "dps-device": ("dps-device.json",), "arm": ("dps-management.json",)}
DPS_SERVICE = ("dps-service.json",)  # every DPS instance: dps1, dps2...
_TYPES = {"string": str, "boolean": bool, "object": dict, "array": list}


@dataclass(frozen=True)
class Operation:
    contract: str
    operation_id: str
    method: str
    pattern: re.Pattern
    query: frozenset[str]
    body: str | None
    responses: dict[str, str | None]


class Contract:
    def __init__(self, filename: str):
        document = json.loads((CONTRACTS / filename).read_text())
        self.name = filename
        self.source = document["source"]
        self.definitions: dict[str, dict] = document["definitions"]
        self.operations = [
            Operation(filename, op["operationId"], op["method"].upper(), _path_pattern(op["path"]),
                      frozenset(q.lower() for q in op["query"]), op["body"], op["responses"])
            for op in document["operations"]]

    def operation(self, method: str, path: str) -> Operation | None:
        return next((op for op in self.operations if op.method == method.upper() and op.pattern.fullmatch(path)),
                    None)


def _path_pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{[^}]+\})", template)
    # ARM compares paths case-insensitively; a parameter may be empty (Key Vault's "latest version": /keys/{name}/)
    return re.compile("".join("[^/]*" if p.startswith("{") else re.escape(p) for p in parts) + "/?", re.IGNORECASE)


def contracts_for(server: str) -> list[Contract]:
    files = SERVERS.get(server) or (DPS_SERVICE if re.fullmatch(r"dps\d+", server) else ())
    return [Contract(f) for f in files]


def check_exchange(exchange: dict, contracts: list[Contract]) -> tuple[Operation | None, list[str]]:
    """(the operation the exchange performed, what in it the spec does not declare)."""
    method, path = exchange["method"], exchange["path"]
    operation = next((op for c in contracts if (op := c.operation(method, path)) is not None), None)
    where = f"{exchange['server']} {method} {path}"
    if operation is None:
        return None, [f"{where}: no such operation in {', '.join(c.name for c in contracts)}"]
    contract = next(c for c in contracts if c.name == operation.contract)
    problems = [f"{where}: query parameter {name!r} is not declared" for name in exchange["query"]
                if name.lower() not in operation.query]
    body = exchange.get("requestBody")
    if body is not None and operation.body is None:
        problems.append(f"{where}: sends a body the operation does not take")
    elif body is not None:
        problems += _fits(contract, operation.body, body, f"{where} request")
    status = str(exchange["status"])
    declared = status if status in operation.responses else ("default" if "default" in operation.responses
                                                              and not status.startswith("2") else None)
    if declared is None:
        problems.append(f"{where}: status {status} is not declared (declared: {', '.join(operation.responses)})")
    elif operation.responses[declared] is not None and exchange.get("responseBody") is not None:
        problems += _fits(contract, operation.responses[declared], exchange["responseBody"],
                          f"{where} response {status}")
    elif operation.responses[declared] is None and exchange.get("responseBody") not in (None, "", {}):
        problems.append(f"{where}: response {status} has a body the spec does not declare")
    return operation, problems


def _fits(contract: Contract, schema: Any, value: Any, where: str) -> list[str]:
    if isinstance(schema, str):  # a definition name, or "array:<Def>"
        if schema.startswith("array:"):
            if not isinstance(value, list):
                return [f"{where}: expected a list, got {type(value).__name__}"]
            return [p for i, item in enumerate(value) for p in _fits(contract, schema[6:], item, f"{where}[{i}]")]
        return _fits(contract, contract.definitions[schema], value, where)
    if "ref" in schema:
        return _fits(contract, schema["ref"], value, where)
    problems = []
    kind = schema.get("type")
    if kind == "integer" and not (isinstance(value, int) and not isinstance(value, bool)):
        return [f"{where}: expected an integer, got {value!r}"]
    if kind == "number" and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return [f"{where}: expected a number, got {value!r}"]
    if kind in _TYPES and not isinstance(value, _TYPES[kind]):
        return [f"{where}: expected {kind}, got {type(value).__name__} {str(value)[:60]!r}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if schema.get("format") == "date-time" and isinstance(value, str):
        try:
            dt.datetime.fromisoformat(value)  # Python 3.11 reads a trailing Z
        except ValueError:
            problems.append(f"{where}: {value!r} is not a date-time")
    if kind == "array" and "items" in schema:
        problems += [p for i, item in enumerate(value) for p in _fits(contract, schema["items"], item, f"{where}[{i}]")]
    if isinstance(value, dict) and (kind == "object" or "properties" in schema):
        declared = schema.get("properties") or {}
        extra = schema.get("additionalProperties", True)
        for name in schema.get("required") or ():
            if name not in value:
                problems.append(f"{where}: required field {name!r} is missing")
        for name, item in value.items():
            if name in declared:
                if item is not None:
                    problems += _fits(contract, declared[name], item, f"{where}.{name}")
            elif isinstance(extra, str):
                extra_schema = {"ref": extra} if extra in contract.definitions else {"type": extra}
                problems += _fits(contract, extra_schema, item, f"{where}.{name}")
            elif declared:  # a described object is closed: an undeclared field is not in the contract
                problems.append(f"{where}: field {name!r} is not declared")
    return problems
