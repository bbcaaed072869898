"""Make the vendored RayJob schema from KubeRay's CRD (run by hand, not by the tests).

    git --git-dir=KUBERAY.git show v1.7.0:ray-operator/config/crd/bases/ray.io_rayjobs.yaml > crd.yaml
    python tests/data/kuberay/trim_crd.py crd.yaml v1.7.0 COMMIT > tests/data/kuberay/ray.io_rayjobs.schema.yaml

Keeps the `v1` openAPIV3Schema without `status` (a manifest never sets it) and moves each
subtree that occurs more than once (the pod template appears three times) into `$defs`,
referenced with `$ref`. Nothing is loosened: the result accepts exactly what the original does.
"""

import json
import sys

import yaml

MIN_CHARS = 400  # smaller repeats (a lone `{type: string}`) stay inline


def _canon(node) -> str:
    return json.dumps(node, sort_keys=True)


def _largest_repeat(tree):
    counts, sizes, first_key = {}, {}, {}

    def walk(node, key):
        if isinstance(node, dict):
            if "$ref" not in node:
                text = _canon(node)
                counts[text] = counts.get(text, 0) + 1
                sizes[text] = len(text)
                first_key.setdefault(text, key)
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)

    walk(tree, "root")
    repeats = [t for t, n in counts.items() if n > 1 and sizes[t] >= MIN_CHARS]
    if not repeats:
        return None, None
    best = max(repeats, key=lambda t: sizes[t])
    return best, first_key[best]


def _replace(node, text, ref):
    if isinstance(node, dict):
        if "$ref" not in node and _canon(node) == text:
            return {"$ref": ref}
        return {k: _replace(v, text, ref) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, text, ref) for v in node]
    return node


def trim(crd: dict) -> dict:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = dict(version["schema"]["openAPIV3Schema"])
    schema["properties"] = {k: v for k, v in schema["properties"].items() if k != "status"}
    defs: dict = {}
    while True:
        text, key = _largest_repeat({"schema": schema, "defs": defs})
        if text is None:
            break
        name, n = key, 2
        while name in defs:
            name, n = f"{key}{n}", n + 1
        ref = f"#/$defs/{name}"
        schema = _replace(schema, text, ref)
        defs = {k: _replace(v, text, ref) for k, v in defs.items()}
        defs[name] = json.loads(text)
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "$defs": defs}
    original = dict(version["schema"]["openAPIV3Schema"])
    original["properties"] = {k: v for k, v in original["properties"].items() if k != "status"}
    assert expand(out) == original
    return out


def expand(trimmed: dict) -> dict:
    """Inline every `$ref` again (the inverse of `trim`, for its self-check)."""
    defs = trimmed["$defs"]

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk({k: v for k, v in trimmed.items() if k not in ("$schema", "$defs")})


if __name__ == "__main__":
    path, tag, commit = sys.argv[1:4]
    out = trim(yaml.safe_load(open(path)))
    sys.stdout.write(
        "# The v1 openAPIV3Schema of KubeRay's RayJob CRD, for tests/test_deploy.py.\n"
        f"# Source: github.com/ray-project/kuberay, ray-operator/config/crd/bases/ray.io_rayjobs.yaml,\n"
        f"# tag {tag}, commit {commit} (Apache License 2.0).\n"
        "# Trimmed by tests/data/kuberay/trim_crd.py: `status` dropped, repeated subtrees moved to $defs.\n"
    )
    yaml.safe_dump(out, sys.stdout, sort_keys=False, width=120)
