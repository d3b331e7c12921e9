"""Validate k8s/kubeflow's Trainer objects offline against the Trainer CRDs' schemas (crds/*.schema.yaml).

Each CRD's openAPIV3Schema becomes a JSON Schema (draft 2020-12) that rejects unknown fields, as
`kubectl apply` does with its default strict field validation. Embedded Kubernetes types
(`x-sft-job-k8s-type`) are checked against kubernetes-validate's strict schema when that package is
importable (`.ci/deploy-checks.sh` installs it), else only as objects. CEL rules
(`x-kubernetes-validations`) are not evaluated. Usage: python k8s/kubeflow/validate.py [FILE...]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
SCHEMAS = sorted((HERE / "crds").glob("*.schema.yaml"))
MANIFESTS = sorted(p for p in HERE.glob("*.yaml") if p.name != "kustomization.yaml")
K8S_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
K8S_VERSION = "1.37.0"  # newest schema kubernetes-validate 1.37 ships; the Trainer's Go types are older


def load_crd_schemas(k8s: bool = True) -> tuple[dict[tuple[str, str], dict[str, Any]], Any]:
    """{(apiVersion, kind): JSON Schema} for every transcribed CRD, and the registry its refs need."""
    definitions = _k8s_definitions() if k8s else None
    schemas = {}
    for path in SCHEMAS:
        crd = yaml.safe_load(path.read_text())
        schema = to_json_schema(crd["openAPIV3Schema"], definitions is not None)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schemas[(f"{crd['group']}/{crd['version']}", crd["kind"])] = schema
    return schemas, _registry(definitions)


def to_json_schema(node: Any, k8s: bool) -> Any:
    """A CRD schema node as JSON Schema: objects with `properties` closed, Kubernetes types referenced."""
    if isinstance(node, list):
        return [to_json_schema(item, k8s) for item in node]
    if not isinstance(node, dict):
        return node
    if "x-sft-job-k8s-type" in node:
        name = node["x-sft-job-k8s-type"]
        return {"$ref": f"{K8S_DEFINITIONS_ID}#/$defs/{name}"} if k8s else {"type": "object"}
    out = {key: to_json_schema(value, k8s) for key, value in copy.deepcopy(node).items()}
    # Unknown fields: the API server prunes them, `kubectl apply` (strict field validation) refuses them.
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def validate_documents(docs: Iterable[dict[str, Any]], schemas: dict, registry: Any) -> list[str]:
    """One message per problem: a kind without a schema, or a schema violation (path: message)."""
    import jsonschema

    errors = []
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = (doc.get("metadata") or {}).get("name", "?")
        if key not in schemas:
            errors.append(f"{key[1]}/{name}: no schema for apiVersion {key[0]!r} kind {key[1]!r}")
            continue
        validator = jsonschema.Draft202012Validator(schemas[key], registry=registry)
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
            path = ".".join(str(part) for part in error.absolute_path) or "(root)"
            errors.append(f"{key[1]}/{name}: {path}: {error.message}")
    return errors


def load_documents(paths: Iterable[Path]) -> list[dict[str, Any]]:
    docs = []
    for path in paths:
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def _k8s_definitions() -> dict[str, Any] | None:
    """kubernetes-validate's strict definitions, found without importing the package (only its data is used)."""
    spec = importlib.util.find_spec("kubernetes_validate")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "kubernetes-json-schema"
    path = root / f"v{K8S_VERSION}-local-strict" / "_definitions.json"
    return json.loads(path.read_text()) if path.exists() else None


def _registry(definitions: dict[str, Any] | None) -> Any:
    from referencing import Registry, Resource

    registry: Any = Registry()
    if definitions is not None:
        registry = registry.with_resource(K8S_DEFINITIONS_ID, Resource.from_contents(definitions))
    return registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="manifests (default: k8s/kubeflow/*.yaml)")
    parser.add_argument("--require-k8s", action="store_true", help="fail when kubernetes-validate is missing")
    args = parser.parse_args(argv)
    schemas, registry = load_crd_schemas()
    k8s = _k8s_definitions() is not None
    if args.require_k8s and not k8s:
        print("kubernetes-validate is not installed: embedded Kubernetes types cannot be checked", file=sys.stderr)
        return 1
    files = args.files or MANIFESTS
    docs = load_documents(files)
    errors = validate_documents(docs, schemas, registry)
    for error in errors:
        print(f"ERROR {error}")
    depth = f"Kubernetes types against v{K8S_VERSION} strict" if k8s else "Kubernetes types as bare objects"
    print(f"{len(docs)} object(s) in {len(files)} file(s), {len(errors)} error(s) ({depth})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
