"""cluster/: launcher configs Ray itself accepts, GPU workers that scale from zero, and secure defaults.

Static checks only (no cloud, no network, no Kubernetes): the launcher configs go through the same
prepare_config + validate_config (ray/autoscaler/ray-schema.json) as `ray up`; the KubeRay manifests
are checked field by field.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from gdro_ray.resource_plan import GROWTH_VARIABLE

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
TOKEN_SECRET_KEY = "auth_token"  # the key KubeRay expects in an authOptions Secret


def launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: one object per file"
    return docs[0]


def commands(config: dict, key: str) -> list[str]:
    return [" ".join(c.split()) for c in config.get(key) or []]


# ---- Ray cluster launcher (aws.yaml, gcp.yaml) --------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_own_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before touching the cloud: merge the provider's defaults, then check the schema.
    validate_config(prepare_config(launcher(name)))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_gpu_workers_scale_from_zero_and_head_has_no_gpus(name):
    config = launcher(name)
    types = config["available_node_types"]
    head = config["head_node_type"]
    workers = {k: v for k, v in types.items() if k != head}
    gpu_workers = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    assert gpu_workers, "a GPU worker type, with its GPUs declared for the autoscaler"
    for node_type in gpu_workers.values():
        assert node_type["min_workers"] == 0
        assert node_type["max_workers"] >= 1
        assert node_type["resources"].get("accelerator_type:A100") == 1
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_workers.values())
    assert types[head]["resources"].get("GPU", 0) == 0
    assert config["idle_timeout_minutes"] > 0


A100_MACHINES = {"aws.yaml": ("InstanceType", "p4d.24xlarge"), "gcp.yaml": ("machineType", "a2-highgpu-8g")}


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_gpu_workers_are_8x_a100_machines(name):
    # Ray's schema leaves node_config to the cloud: check the declared GPUs match the machine.
    config = launcher(name)
    field, machine = A100_MACHINES[name]
    gpu_workers = [t for k, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0]
    assert [t["node_config"][field] for t in gpu_workers] == [machine] * len(gpu_workers)
    assert all(t["resources"]["GPU"] == 8 for t in gpu_workers)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_starts_every_node_with_token_auth(name):
    config = launcher(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in commands(config, key) if "ray start" in c]
        assert starts, key
        for command in starts:
            assert re.search(r"\bRAY_AUTH_MODE=token\b", command), f"{key}: {command}"
            assert "RAY_AUTH_MODE=disabled" not in command
    # The token reaches the nodes from the launching machine's default token file, not from the repo.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_dashboard_stays_on_loopback(name):
    config = launcher(name)
    head_start = [c for c in commands(config, "head_start_ray_commands") if "ray start" in c]
    assert all(re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", c) for c in head_start)
    every_command = [c for key in config if key.endswith("_commands") for c in commands(config, key)]
    assert not any("0.0.0.0" in c for c in every_command)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_installs_the_synced_working_tree(name):
    config = launcher(name)
    assert config["file_mounts"]["~/gdro-ray"] == "."
    assert any("pip install" in c and "-e ~/gdro-ray" in c for c in commands(config, "setup_commands"))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_head_declares_how_far_the_cluster_grows(name):
    """The jobs' resource plan reads the ceiling from the head's environment; it must match the node types."""
    config = launcher(name)
    (start,) = [c for c in commands(config, "head_start_ray_commands") if "ray start" in c]
    declared = json.loads(re.search(rf"{GROWTH_VARIABLE}='([^']+)'", start).group(1))
    types = config["available_node_types"]
    counts = {name: 1 if name == config["head_node_type"] else t["max_workers"] for name, t in types.items()}
    assert declared == {key: sum(counts[name] * t["resources"].get(key, 0) for name, t in types.items())
                        for key in ("CPU", "GPU")}


# ---- KubeRay (kuberay/raycluster.yaml, kuberay/rayjob.yaml) -------------------------------------


CLUSTER_SPECS = ["raycluster", "rayjob"]


def cluster_spec(which: str) -> dict:
    """The RayCluster spec: the RayCluster's own, or the one the RayJob creates."""
    if which == "raycluster":
        return manifest("raycluster.yaml")["spec"]
    return manifest("rayjob.yaml")["spec"]["rayClusterSpec"]


def test_kuberay_kinds():
    assert (manifest("raycluster.yaml")["apiVersion"], manifest("raycluster.yaml")["kind"]) == ("ray.io/v1", "RayCluster")
    assert (manifest("rayjob.yaml")["apiVersion"], manifest("rayjob.yaml")["kind"]) == ("ray.io/v1", "RayJob")


def test_rayjob_runs_align_and_cleans_up():
    spec = manifest("rayjob.yaml")["spec"]
    assert spec["entrypoint"].split()[:2] == ["python", "jobs/align.py"]
    assert "--task geneval" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("which", CLUSTER_SPECS)
def test_kuberay_autoscales_gpu_group_from_zero(which):
    spec = cluster_spec(which)
    assert spec["enableInTreeAutoscaling"] is True
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0]
    assert gpu_groups
    for group in gpu_groups:
        assert group["minReplicas"] == 0
        assert group["maxReplicas"] >= 1


@pytest.mark.parametrize("which", CLUSTER_SPECS)
def test_kuberay_head_declares_how_far_the_cluster_grows(which):
    spec = cluster_spec(which)
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    declared = json.loads({e["name"]: e for e in head["env"]}[GROWTH_VARIABLE]["value"])
    expected = {"CPU": int(head["resources"]["limits"]["cpu"]), "GPU": 0}
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        expected["CPU"] += group["maxReplicas"] * int(limits["cpu"])
        expected["GPU"] += group["maxReplicas"] * int(limits.get("nvidia.com/gpu", 0))
    assert declared == expected


@pytest.mark.parametrize("which", CLUSTER_SPECS)
def test_kuberay_head_service_is_not_public(which):
    spec = cluster_spec(which)
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


@pytest.mark.parametrize("which", CLUSTER_SPECS)
def test_kuberay_token_auth_from_a_secret(which):
    spec = cluster_spec(which)
    auth = spec["authOptions"]
    assert auth["mode"] == "token"
    secret = auth["secretName"]
    envs = {"autoscaler": spec["autoscalerOptions"]["env"]}
    envs["head"] = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    for group in spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            envs[f"{group['groupName']}/{container['name']}"] = container["env"]
    for where, env in envs.items():
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"].get("value") == "token", where
        token = by_name["RAY_AUTH_TOKEN"]
        assert "value" not in token, where
        assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": TOKEN_SECRET_KEY}, where


# ---- No secrets in cluster/ ---------------------------------------------------------------------

# Shapes of real credentials: Hugging Face, GitHub, AWS keys, OpenAI-style keys, private keys, and long
# hex strings (a Ray token from `ray get-auth-token --generate`, `openssl rand -hex`).
SECRET_SHAPES = [
    r"\bhf_[A-Za-z0-9]{20,}",
    r"\b(?:ghp|gho|ghs)_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}",
    r"\bAKIA[0-9A-Z]{16}\b",
    r"\bsk-[A-Za-z0-9_-]{20,}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"\b[0-9a-fA-F]{32,}\b",
]
# NAME=value where NAME looks like a credential and the value is not an expansion ($VAR, $(...)).
LITERAL_ASSIGNMENT = re.compile(r"\b[A-Za-z0-9_]*(?:TOKEN|SECRET|PASSWORD|API_KEY)[A-Za-z0-9_]*=(?![\"']?\$)[\"']?\w", re.I)
SENSITIVE_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY", re.I)


def cluster_files() -> list[Path]:
    files = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert any(p.suffix == ".yaml" for p in files)
    return files


def walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from walk(child)


def test_no_literal_credentials_in_cluster_files():
    for path in cluster_files():
        text = path.read_text()
        for shape in SECRET_SHAPES:
            match = re.search(shape, text)
            assert match is None, f"{path.relative_to(CLUSTER)}: {match.group(0)[:12]}..."
        match = LITERAL_ASSIGNMENT.search(text)
        assert match is None, f"{path.relative_to(CLUSTER)}: {match.group(0)}"


def test_manifests_take_credentials_only_from_secrets():
    for path in (CLUSTER / "kuberay").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc.get("kind") != "Secret", f"{path.name}: create Secrets with kubectl, not in the repo"
            for node in walk(doc):
                if isinstance(node, dict) and isinstance(node.get("name"), str) and SENSITIVE_ENV.search(node["name"]):
                    if "value" in node or "valueFrom" in node:  # an env entry
                        assert "value" not in node and "secretKeyRef" in node["valueFrom"], f"{path.name}: {node['name']}"
