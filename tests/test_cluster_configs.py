"""Cluster configs parse, have the fields their tools require, and only name real commands/configs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from rpg_dist.cli import build_parser
from rpg_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _check_command(command: str) -> None:
    """A `rpg-dist ...` command line parses with our CLI and its config + overrides load."""
    words = shlex.split(command)
    assert words[0] == "rpg-dist", command
    args = build_parser().parse_args(words[1:])
    if hasattr(args, "config"):
        config = REPO / "configs" / Path(args.config).name
        assert config.exists(), f"{command}: no such config {args.config}"
        load_config(str(config), args.overrides)


def _commands_in_comments(path: Path) -> list[str]:
    """`rpg-dist ...` commands written in a file's comments or code blocks, continuations joined."""
    text = re.sub(r"\\\n\s*#?\s*", " ", path.read_text())
    return [m.strip() for m in re.findall(r"(rpg-dist (?:submit|run|prepare|train|tokenize) --[^\n`]*)", text)]


def test_aws_autoscaler_config():
    cfg = _yaml("aws.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    assert {"head", "cpu_tokenize", "gpu_train"} <= set(nodes)
    assert nodes["head"]["resources"] == {"CPU": 0}
    assert nodes["gpu_train"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert nodes["cpu_tokenize"]["node_config"]["InstanceType"].startswith("c")
    for group in ("cpu_tokenize", "gpu_train"):
        assert nodes[group]["min_workers"] <= nodes[group]["max_workers"] <= cfg["max_workers"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_manifests(name):
    manifest = _yaml(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    assert manifest["kind"] in ("RayCluster", "RayJob")
    assert spec["rayVersion"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and head["resources"]["limits"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"cpu-tokenize", "gpu-train"} <= set(groups)
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu = groups["gpu-train"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1


def test_rayjob_entrypoint_is_a_real_command():
    job = _yaml("kuberay/rayjob.yaml")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    _check_command(job["spec"]["entrypoint"])
    assert "s3://" in job["spec"]["entrypoint"]


@pytest.mark.parametrize("name", ["aws.yaml", "kuberay/raycluster.yaml", "README.md"])
def test_documented_commands_are_real(name):
    commands = _commands_in_comments(CLUSTER / name)
    assert commands, f"{name} documents no rpg-dist command"
    for command in commands:
        _check_command(command)


def test_dockerfile_installs_the_package():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "rayproject/ray:" in text and "/opt/rpg-dist" in text and "faiss-gpu" in text


def _ray_containers(manifest: dict) -> list[dict]:
    spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    if manifest["kind"] == "RayJob":
        containers += manifest["spec"]["submitterPodTemplate"]["spec"]["containers"]
    return containers


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_clusters_are_closed_by_default(name):
    """A dashboard reachable from other pods must demand Ray's token in every Ray container."""
    for container in _ray_containers(_yaml(name)):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (name, container["name"])
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "rpg-dist-ray-token"


def test_aws_dashboard_listens_on_loopback_only():
    for command in _yaml("aws.yaml")["head_start_ray_commands"]:
        if "ray start --head" in command:
            assert "--dashboard-host=127.0.0.1" in command and "0.0.0.0" not in command
