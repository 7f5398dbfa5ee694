"""Check a manifest against the generated CRD schema the way the apiserver does, offline.

Defaults are applied, unknown fields are refused (kubectl's strict field validation), the
OpenAPI keywords are checked with jsonschema and every CEL rule is evaluated with cel-python (with
the part of Kubernetes' quantity library the rules use).
This catches a CEL typo or a rule that disagrees with the pydantic models in a unit test;
the same corpus also goes to a real apiserver in the integration tests of the local runtime.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Final

import celpy
import jsonschema
from celpy import celtypes
from celpy.adapter import json_to_cel

from kubetune_api.spec import quantity_value

Schema = dict[str, Any]


def _is_quantity(text: Any) -> celtypes.BoolType:
    try:
        quantity_value(str(text))
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


def _compare_to(left: Any, right: Any) -> celtypes.IntType:
    return celtypes.IntType((left > right) - (left < right))


#: The part of Kubernetes' CEL quantity library the CRD's rules use, for the quantities the schema admits.
QUANTITY_LIBRARY: Final[dict[str, Any]] = {
    "isQuantity": _is_quantity,
    "quantity": lambda text: quantity_value(str(text)),
    "compareTo": _compare_to,
}


def apply_defaults(value: Any, schema: Schema) -> Any:
    """Structural defaulting: fill missing fields that have a default, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


def unknown_fields(value: Any, schema: Schema, path: str) -> list[str]:
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        for name, sub_value in value.items():
            where = f"{path}.{name}" if path else name
            if name not in schema["properties"]:
                if not (path == "" and name == "status"):
                    found.append(where)
            elif schema["properties"][name] != {"type": "object"}:  # metadata is the apiserver's
                found += unknown_fields(sub_value, schema["properties"][name], where)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


def _plain(schema: Any) -> Any:
    """The schema without Kubernetes extensions, for jsonschema (draft 4 exclusive bounds)."""
    if isinstance(schema, dict):
        return {k: _plain(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if isinstance(schema, list):
        return [_plain(v) for v in schema]
    return schema


def _cel_errors(value: Any, schema: Schema, path: str, env: celpy.Environment) -> list[str]:
    found: list[str] = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # transition rules need an update; tested on a real apiserver
        program = env.program(env.compile(rule["rule"]), functions=QUANTITY_LIBRARY)
        if not program.evaluate({"self": json_to_cel(value)}):
            found.append(path + rule.get("fieldPath", "") + ": " + rule["message"])
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                found += _cel_errors(value[name], sub, f"{path}.{name}" if path else name, env)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += _cel_errors(item, schema["items"], f"{path}[{index}]", env)
    return found


def check(manifest: dict[str, Any], schema: Schema) -> list[str]:
    """Every reason the apiserver would refuse ``manifest``, as 'field.path: message' strings."""
    value = apply_defaults(copy.deepcopy(manifest), schema)
    problems = [f"{f}: unknown field" for f in unknown_fields(value, schema, "")]
    validator = jsonschema.Draft4Validator(_plain(schema))
    for error in validator.iter_errors(value):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        if error.validator == "required":  # the apiserver names the missing field itself
            missing = re.match(r"'([^']+)' is a required property", error.message)
            where = f"{where}.{missing.group(1)}" if missing else where
        problems.append(f"{where}: {error.message}")
    if not problems:  # like the apiserver, CEL runs only on a schema-valid object
        problems += _cel_errors(value, schema, "", celpy.Environment())
    return problems
