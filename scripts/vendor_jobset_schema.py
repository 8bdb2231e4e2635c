"""Regenerate tests/schemas/jobset-v1alpha2.json from JobSet's published CRD.

usage: python scripts/vendor_jobset_schema.py CRD_YAML [JOBSET_COMMIT]
  CRD_YAML: config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml of kubernetes-sigs/jobset

Keeps JobSet's own fields (spec, failurePolicy, replicatedJobs, ...) and replaces each
replicated job's `template` (a batch/v1 JobTemplateSpec, 800 kB of embedded PodSpec schema)
by "any object": the tests validate those templates with kubernetes-validate's own Job
schema instead. Objects without x-kubernetes-preserve-unknown-fields get
additionalProperties: false, so a misspelled field fails instead of being pruned silently.
"""

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "schemas" / "jobset-v1alpha2.json"


def strict(schema):
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def main(crd_path: str, commit: str = "") -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2")
    schema = version["schema"]["openAPIV3Schema"]
    schema["properties"].pop("status", None)
    job = schema["properties"]["spec"]["properties"]["replicatedJobs"]["items"]
    job["properties"]["template"] = {
        "type": "object", "x-kubernetes-preserve-unknown-fields": True,
        "description": "batch/v1 JobTemplateSpec: validated with kubernetes-validate's Job schema"}
    schema["properties"]["metadata"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    schema = strict(schema)
    schema["$comment"] = f"From kubernetes-sigs/jobset {commit} {crd_path.split('repo/')[-1]} (Apache-2.0), trimmed by scripts/vendor_jobset_schema.py"
    OUT.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
