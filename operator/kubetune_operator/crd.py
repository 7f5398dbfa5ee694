"""Generate the FineTuneJob and ModelServer CustomResourceDefinitions from the pydantic models.

The models are the source of truth; the CRD is derived: pydantic's JSON schema is rewritten
into the structural OpenAPI v3 subset that Kubernetes accepts (no ``$ref``, no ``anyOf`` for
optional fields, draft-4 style exclusive bounds), and the cross-field rules are added as CEL
``x-kubernetes-validations`` from the same table the models check.
"""

from __future__ import annotations

import copy
from typing import Any, Final

import yaml
from pydantic import BaseModel

from kubetune_api import IMMUTABLE_ONCE_STARTED, RULES
from kubetune_api.modelserver import MS_KIND, MS_PLURAL, MS_SHORT_NAMES, MS_SINGULAR, SERVER_RULES, ModelServer
from kubetune_api.resource import (
    API_VERSION,
    GROUP,
    KIND,
    MAX_NAME_LENGTH,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    FineTuneJob,
)
from kubetune_api.spec import MAX_STORAGE
from kubetune_api.uris import (
    DATASET_SCHEMES,
    MODEL_SCHEMES,
    OUTPUT_SCHEMES,
    TRACKING_SCHEMES,
    Scheme,
    forms,
    pattern_for,
)

Schema = dict[str, Any]

#: JSON-schema keywords Kubernetes' structural schemas do not take; they are dropped.
_DROPPED: Final = frozenset({"title", "propertyNames", "$defs"})

#: URI fields checked by a CEL ``matches`` rule with a message naming the accepted forms.
_URI_FIELDS: Final[dict[tuple[str, ...], tuple[Scheme, ...]]] = {
    ("spec", "model", "source"): MODEL_SCHEMES,
    ("spec", "dataset", "source"): DATASET_SCHEMES,
    ("spec", "output", "destination"): OUTPUT_SCHEMES,
    ("spec", "training", "tracking", "mlflowTrackingUri"): TRACKING_SCHEMES,
}

#: Quantity fields with an upper bound, checked by a CEL rule with Kubernetes' quantity library (the
#: models check the same bound on the exact value).
_QUANTITY_BOUNDS: Final[dict[tuple[str, ...], str]] = {
    ("spec", "resources", "storage", "size"): MAX_STORAGE,
}

PRINTER_COLUMNS: Final[list[Schema]] = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "description": "Base model source"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type", "description": "Fine-tuning method"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase"},
    {
        "name": "Progress%",
        "type": "integer",
        "jsonPath": ".status.progress.percent",
        "description": "Training steps done, in percent",
    },
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "description": "Latest training loss"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

MS_PRINTER_COLUMNS: Final[list[Schema]] = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "description": "Base model source"},
    {"name": "Runtime", "type": "string", "jsonPath": ".spec.runtime", "description": "Serving runtime"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Pending, Ready or NotReady"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas", "description": "Replicas that answer"},
    {
        "name": "Adapters",
        "type": "integer",
        "jsonPath": ".status.adapters[*].loadedReplicas",
        "priority": 1,
        "description": "Replicas holding each adapter",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _resolve(node: Any, defs: dict[str, Schema]) -> Any:  # noqa: PLR0912 - one branch per JSON-schema rewrite
    """Inline ``$ref``s and rewrite each schema node into the structural subset."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        target = _resolve(defs[ref.rsplit("/", 1)[-1]], defs)
        # The field's own keywords (its description, default) win over the model's.
        node = {**target, **{k: v for k, v in node.items() if k != "description" or v}}
    all_of = node.pop("allOf", None)
    if all_of is not None and len(all_of) == 1:
        node = {**_resolve(all_of[0], defs), **node}
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        kept = [s for s in any_of if s.get("type") != "null"]
        if len(kept) != 1:
            raise ValueError(f"cannot express anyOf {any_of} in a structural schema")
        node = {**_resolve(kept[0], defs), **node}
        if node.get("default", ...) is None:
            del node["default"]
    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "additionalProperties" and value is False:
            continue  # structural schemas prune unknown fields; kubectl's strict validation names them
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: _resolve(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _resolve(value, defs)
        else:
            out[key] = value
    return out


def _at(schema: Schema, path: tuple[str, ...]) -> Schema:
    for name in path:
        schema = schema["properties"][name]
    return schema


def _add_rules(schema: Schema) -> None:
    spec = _at(schema, ("spec",))
    spec["x-kubernetes-validations"] = [
        {"rule": r.cel, "message": f"{r.field}: {r.message}", "fieldPath": r.field_path, "reason": "FieldValueInvalid"}
        for r in RULES
    ]
    for path, schemes in _URI_FIELDS.items():
        field = _at(schema, path)
        field["x-kubernetes-validations"] = [
            {"rule": f"self.matches(r'{pattern_for(schemes)}')", "message": f"must be one of {forms(schemes)}"}
        ]
    for path, bound in _QUANTITY_BOUNDS.items():
        field = _at(schema, path)
        field["x-kubernetes-validations"] = [
            {
                "rule": f"!isQuantity(self) || quantity(self).compareTo(quantity('{bound}')) <= 0",
                "message": f"must be at most {bound}",
            }
        ]
    schema["x-kubernetes-validations"] = [
        {
            "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            "message": f"metadata.name: use at most {MAX_NAME_LENGTH} characters so that the names of its pods fit in 63",
        },
        *(
            {
                "rule": "!has(oldSelf.status) || !has(oldSelf.status.startTime) "
                f"|| self.spec.{f.field} == oldSelf.spec.{f.field}",
                "message": f.message,
                "fieldPath": f".spec.{f.field}",
                "reason": "FieldValueForbidden",
            }
            for f in IMMUTABLE_ONCE_STARTED
        ),
        {
            # The rules above hinge on status.startTime: once there, nobody (a user with access to
            # the status subresource included) may take it away to lift them.
            "rule": "!has(oldSelf.status) || !has(oldSelf.status.startTime) "
            "|| (has(self.status) && has(self.status.startTime))",
            "message": "status.startTime records that training started and keeps spec.model and the method from "
            "changing; it cannot be removed (create a new FineTuneJob to train something else)",
            "fieldPath": ".status.startTime",
            "reason": "FieldValueForbidden",
        },
    ]


def _model_schema(model: type[BaseModel], kind: str, description: str) -> Schema:
    """A model's structural OpenAPI v3 schema, apiVersion, kind and metadata named only."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema: Schema = _resolve(raw, raw.get("$defs", {}))
    props = schema["properties"]
    # apiVersion, kind and metadata are the apiserver's; the schema only names them.
    props["apiVersion"] = {"type": "string", "description": f"{API_VERSION}"}
    props["kind"] = {"type": "string", "description": kind}
    props["metadata"] = {"type": "object"}
    schema.pop("description", None)
    schema["description"] = description
    schema["required"] = ["spec"]
    return schema


def openapi_schema() -> Schema:
    """The structural OpenAPI v3 schema of a FineTuneJob, with its CEL rules."""
    schema = _model_schema(
        FineTuneJob,
        KIND,
        "A FineTuneJob fine-tunes a base model on a dataset and publishes (and optionally serves) the result.",
    )
    _add_rules(schema)
    return schema


def model_server_schema() -> Schema:
    """The structural OpenAPI v3 schema of a ModelServer."""
    schema = _model_schema(
        ModelServer,
        MS_KIND,
        "A ModelServer serves one base model with the adapters of many FineTuneJobs, loaded and unloaded at run time.",
    )
    _at(schema, ("spec", "model", "source"))["x-kubernetes-validations"] = [
        {"rule": f"self.matches(r'{pattern_for(MODEL_SCHEMES)}')", "message": f"must be one of {forms(MODEL_SCHEMES)}"}
    ]
    _at(schema, ("spec",))["x-kubernetes-validations"] = [
        {"rule": rule.cel, "message": rule.message, "fieldPath": f".{rule.field}", "reason": "FieldValueInvalid"}
        for rule in SERVER_RULES
    ]
    schema["x-kubernetes-validations"] = [
        {
            "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            "message": f"metadata.name: use at most {MAX_NAME_LENGTH} characters",
        }
    ]
    return schema


def _crd(
    kind: str, plural: str, *, singular: str, short: tuple[str, ...], columns: list[Schema], schema: Schema
) -> Schema:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": list(short),
                "categories": ["kubetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(columns),
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def build_crd() -> Schema:
    """The FineTuneJob CustomResourceDefinition manifest."""
    return _crd(KIND, PLURAL, singular=SINGULAR, short=SHORT_NAMES, columns=PRINTER_COLUMNS, schema=openapi_schema())


def build_model_server_crd() -> Schema:
    """The ModelServer CustomResourceDefinition manifest."""
    return _crd(
        MS_KIND,
        MS_PLURAL,
        singular=MS_SINGULAR,
        short=MS_SHORT_NAMES,
        columns=MS_PRINTER_COLUMNS,
        schema=model_server_schema(),
    )


HEADER: Final = "# Generated by `kubetune crd` from the pydantic models; do not edit. Regenerate with `make crds`.\n"


def render_crd(kind: str = KIND) -> str:
    """A CRD (FineTuneJob's, or ModelServer's) as the YAML text committed under crds/."""
    crd = build_model_server_crd() if kind == MS_KIND else build_crd()
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=120, allow_unicode=True)
