"""Schemas of the custom resources deploy/k8s uses (KEDA, Prometheus operator), which kubernetes-validate
does not ship: taken from the `cloudcoil-models-keda` and `cloudcoil-models-prometheus-operator` wheels,
whose pydantic models are generated from those projects' CRDs (their versions pin the CRD versions).

The models ignore unknown fields, as an API server with pruning would; kubectl validates strictly by
default and rejects them. So the JSON schema is made strict: every object with declared properties gets
`additionalProperties: false`, and a misspelt field (`minReplicaCout`) is an error, as it would be at apply.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jsonschema
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from cloudcoil.models.prometheus_operator.v1 import PodMonitor, PrometheusRule, ServiceMonitor
from pydantic import BaseModel

MODELS: dict[tuple[str, str], type[BaseModel]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TriggerAuthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
    ("monitoring.coreos.com/v1", "PodMonitor"): PodMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule,
}


def _strict(node: Any) -> None:
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)


@cache
def _validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = MODELS[(api_version, kind)].model_json_schema(by_alias=True, mode="validation")
    _strict(schema)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def is_custom(doc: dict[str, Any]) -> bool:
    return (doc["apiVersion"], doc["kind"]) in MODELS


def errors(doc: dict[str, Any]) -> list[str]:
    """Schema errors of one custom resource (empty when valid); `path: message` each."""
    found = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
             for e in _validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)]
    if not found:  # the model's own checks too (enums and literals beyond the JSON schema)
        MODELS[(doc["apiVersion"], doc["kind"])].model_validate(doc)
    return found
