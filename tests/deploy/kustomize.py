"""A small renderer of kustomization.yaml for the subset deploy/k8s uses, so the manifests can be checked
offline on a machine without kustomize (no pip package ships a kustomize build).

Supported: `resources` (files and folders), `namespace`, `labels` (metadata only: `includeSelectors` and
`includeTemplates` false), `images` and `patches` given as inline JSON 6902 operations with a `target`.
Any other key is an error, so a kustomization that grows past this subset cannot be rendered wrongly in
silence. Where kubectl (with its built-in kustomize) is present, a test checks that both render the same.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
#: kinds in this project that are not namespaced (kustomize leaves their namespace alone)
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
                  "StorageClass", "PersistentVolume", "RuntimeClass"}


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not do (or does it wrongly)."""


def render(folder: Path) -> list[Doc]:
    """The objects `kustomize build folder` gives, in resource order."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{folder}/kustomization.yaml: unsupported keys {sorted(unknown)}")
    docs: list[Doc] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", []):
        _patch(docs, patch)
    for image in spec.get("images", []):
        for doc in docs:
            _set_image(doc, image)
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = spec["namespace"]
    for group in spec.get("labels", []):
        if group.get("includeSelectors") or group.get("includeTemplates"):
            raise KustomizeError("labels: only includeSelectors/includeTemplates false are supported")
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
    return docs


def _matches(doc: Doc, target: dict[str, str]) -> bool:
    group, version = target.get("group", ""), target.get("version")
    api_group, _, api_version = doc["apiVersion"].rpartition("/")
    return (doc["kind"] == target.get("kind", doc["kind"]) and doc["metadata"]["name"] == target.get("name", doc[
        "metadata"]["name"]) and api_group == group and (version is None or api_version == version))


def _patch(docs: list[Doc], patch: dict[str, Any]) -> None:
    if set(patch) != {"target", "patch"}:
        raise KustomizeError(f"patches: only inline `patch` with a `target` is supported, got {sorted(patch)}")
    operations = yaml.safe_load(patch["patch"])
    if not isinstance(operations, list):
        raise KustomizeError("patches: only JSON 6902 operation lists are supported")
    hits = [d for d in docs if _matches(d, patch["target"])]
    if not hits:
        raise KustomizeError(f"patch target {patch['target']} matches no resource")
    for doc in hits:
        for op in operations:
            apply_operation(doc, op)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_operation(doc: Doc, op: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove) on `doc`, in place."""
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    kind = op["op"]
    if isinstance(node, list):
        if kind == "add":
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif kind == "replace":
            node[int(last)] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[int(last)]
        else:
            raise KustomizeError(f"unsupported op {kind}")
        return
    if kind in ("replace", "remove") and last not in node:
        raise KustomizeError(f"{kind} {op['path']}: no such member")
    if kind in ("add", "replace"):
        node[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[last]
    else:
        raise KustomizeError(f"unsupported op {kind}")


def _set_image(doc: Doc, image: dict[str, str]) -> None:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
        name, _, tag = container["image"].partition(":")
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        tag = image.get("newTag", tag)
        container["image"] = f"{name}:{tag}" if tag else name
