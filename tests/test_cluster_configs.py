"""The cluster configs shipped under conf/clusters/, checked without a cloud or a Kubernetes cluster.

* Ray cluster launcher YAML (conf/clusters/ray/): Ray's own schema (ray/autoscaler/ray-schema.json, with
  jsonschema), then what `ray up` does to a config before it calls AWS (Ray's prepare_config and
  validate_config, the EFA interface bootstrap), EC2's RunInstances request shape (botocore's model)
  for every node_config, and what no schema says: the head trains nothing, worker counts are
  consistent, every node installs moeforge, the GPU type has 8 GPUs and EFA.
* KubeRay manifests (conf/clusters/kuberay/): the fields KubeRay needs, GPU requests equal to limits,
  and enough GPUs and CPUs for the preset each job runs, from the TrainConfig that preset composes to.
* The `ray job submit` commands written in the files' comments compose (through moeforge's own config
  path) and fit the cluster they are written for.
* Hydra's composition of conf/train.yaml and conf/estimate.yaml is untouched by the folder, though
  Hydra sees it as a config group named `cluster` (estimate.yaml has a `cluster:` section of its own).

The KubeRay manifests are also validated against CRD schemas with unknown fields made errors:
moeforge's own subset of KubeRay's v1 API in tests/data/kuberay/ (the fields the manifests use, as
KubeRay's CRDs declare them), or, with KUBERAY_CRD_DIR set to a KubeRay checkout's
ray-operator/config/crd/bases, the operator's full CRDs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.resources
import json
import math
import os
import re
import shlex
import subprocess
import sys

import jsonschema
import moeforge.jobs.train  # noqa: F401  registers the ${moeforge.sweep_subdir:} resolver of conf/train.yaml
import pytest
import ray
import yaml
from moeforge.platform.cli import compose_values
from moeforge.platform.config import TrainConfig
from moeforge.platform.config.builder import ConfigError
from moeforge.platform.launch.cluster_check import check_cluster_fits

CONF = importlib.resources.files("moeforge.conf")
RAY_DIR = CONF / "clusters" / "ray"
KUBERAY_DIR = CONF / "clusters" / "kuberay"
RAY_FILES = sorted(f.name for f in RAY_DIR.iterdir() if f.name.endswith(".yaml"))
KUBERAY_FILES = sorted(f.name for f in KUBERAY_DIR.iterdir() if f.name.endswith(".yaml"))
ESTIMATE = os.path.join(os.path.dirname(sys.executable), "moeforge-estimate")

# What `ray up` would otherwise take from Ray's defaults.yaml (which installs a Ray nightly wheel).
SPELLED_OUT_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
    "file_mounts",
    "cluster_synced_files",
    "rsync_exclude",
    "rsync_filter",
    "docker",
    "auth",
)
# KubeRay names the head service <cluster>-head-svc and a RayJob's cluster <job>-<5 chars>; both must
# stay a DNS-1123 label (63 characters).
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,46}[a-z0-9])?$")


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def ray_schema() -> dict:
    return json.loads((importlib.resources.files("ray.autoscaler") / "ray-schema.json").read_text())


def load_ray(name: str) -> dict:
    return yaml.safe_load((RAY_DIR / name).read_text())


def load_kuberay(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBERAY_DIR / name).read_text()) if doc is not None]


def schema_errors(config: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(ray_schema())
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(config)]


def worker_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {name: t for name, t in config["available_node_types"].items() if name != head}


def is_gpu_config(config: dict) -> bool:
    return any(t["resources"].get("GPU", 0) > 0 for t in worker_types(config).values())


def launcher_problems(config: dict) -> list[str]:
    """What Ray's schema does not express, for one cluster launcher config."""
    problems = []
    head = config["available_node_types"][config["head_node_type"]]
    if head["resources"].get("CPU") != 0 or head["resources"].get("GPU", 0) != 0:
        problems.append(
            f"head: resources must be CPU 0 and no GPU (no worker on it), got {head['resources']}"
        )
    if re.match(r"^(p|g)\d", head["node_config"]["InstanceType"]):
        problems.append(f"head: {head['node_config']['InstanceType']} is a GPU instance")
    if head.get("max_workers", 0) != 0 or head.get("min_workers", 0) != 0:
        problems.append("head: min_workers and max_workers must be 0 (there is one head)")
    total_min = 0
    for name, node_type in worker_types(config).items():
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers", config["max_workers"])
        total_min += lo
        if not 0 <= lo <= hi <= config["max_workers"]:
            problems.append(
                f"{name}: need 0 <= min_workers ({lo}) <= max_workers ({hi}) <= global max_workers"
            )
        if node_type["resources"].get("CPU", 0) <= 0:
            problems.append(f"{name}: a worker node type must offer CPUs")
    if total_min > config["max_workers"]:
        problems.append(
            f"global max_workers {config['max_workers']} < the node types' min_workers {total_min}"
        )
    if not worker_types(config):
        problems.append("no worker node type")
    for key in SPELLED_OUT_KEYS:
        if key not in config:
            problems.append(f"{key}: missing, so `ray up` would take Ray's defaults.yaml value")
    return problems


def kuberay_cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def cpu_quantity(value) -> float:
    """A Kubernetes CPU quantity: 8, "8", "500m"."""
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_ray_resources(group: dict) -> dict[str, float]:
    """The Ray resources KubeRay gives one pod of a group: rayStartParams when set, else the Ray
    container's limits (CPUs rounded up, as Ray counts whole CPUs)."""
    params = group["rayStartParams"]
    limits = containers(group)[0].get("resources", {}).get("limits", {})
    cpu = float(params["num-cpus"]) if "num-cpus" in params else math.ceil(cpu_quantity(limits.get("cpu", 0)))
    gpu = float(params["num-gpus"]) if "num-gpus" in params else float(limits.get("nvidia.com/gpu", 0))
    return {"CPU": cpu, "GPU": gpu}


def kuberay_problems(doc: dict) -> list[str]:
    """The fields KubeRay needs and moeforge's rules for one RayCluster or RayJob manifest."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: expected ray.io/v1, got {doc.get('apiVersion')!r}")
    if doc.get("kind") not in ("RayCluster", "RayJob"):
        return problems + [f"kind: expected RayCluster or RayJob, got {doc.get('kind')!r}"]
    name = doc.get("metadata", {}).get("name", "")
    if not K8S_NAME.match(name):
        problems.append(f"metadata.name: {name!r} is not a DNS-1123 label of at most 48 characters")
    if doc["kind"] == "RayJob":
        spec = doc["spec"]
        if not spec.get("entrypoint", "").startswith("moeforge-train "):
            problems.append("spec.entrypoint: must run moeforge-train")
        if "rayClusterSpec" not in spec:
            return problems + ["spec.rayClusterSpec: missing (this repo's jobs bring their own cluster)"]
        if spec.get("shutdownAfterJobFinishes") is not True:
            problems.append("spec.shutdownAfterJobFinishes: must be true (the job's cluster ends with it)")
    cluster = kuberay_cluster_spec(doc)
    if cluster.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion: {cluster.get('rayVersion')!r} is not this Ray ({ray.__version__})")
    head = cluster["headGroupSpec"]
    groups = cluster.get("workerGroupSpecs") or []
    for where, params in [("headGroupSpec", head.get("rayStartParams"))] + [
        (f"workerGroupSpecs[{i}]", g.get("rayStartParams")) for i, g in enumerate(groups)
    ]:
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{where}.rayStartParams: must be a mapping of strings")
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("headGroupSpec.rayStartParams.num-cpus: must be '0' (no worker on the head)")
    if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers(head)):
        problems.append("headGroupSpec: the head asks for GPUs")
    if not groups:
        problems.append("workerGroupSpecs: missing")
    for i, group in enumerate(groups):
        where = f"workerGroupSpecs[{i}]"
        missing = [k for k in ("groupName", "replicas", "minReplicas", "maxReplicas") if k not in group]
        if missing:
            problems.append(f"{where}: missing {missing}")
            continue
        if not 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
            problems.append(f"{where}: need 0 <= minReplicas <= replicas <= maxReplicas")
    images = set()
    for group in [head, *groups]:
        for c in containers(group):
            images.add(c["image"])
            resources = c.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            for key in set(requests) | set(limits):
                if str(requests.get(key)) != str(limits.get(key)):
                    problems.append(
                        f"container {c['name']}: {key} requests {requests.get(key)} != limits {limits.get(key)}"
                    )
    gpu = any(pod_ray_resources(g)["GPU"] > 0 for g in groups)
    if len(images) != 1 or not next(iter(images)).endswith("-gpu" if gpu else "-cpu"):
        problems.append(
            f"images: one moeforge image for every pod, -gpu or -cpu as the workers are: {images}"
        )
    return problems


def cluster_resources(head: dict[str, float], pools: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Total Ray resources of a head plus (count, per-node resources) pools."""
    total = {"CPU": head.get("CPU", 0.0), "GPU": head.get("GPU", 0.0)}
    for count, per_node in pools:
        for key in total:
            total[key] += count * per_node.get(key, 0.0)
    return total


def launcher_sizes(config: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(resources at start: head and min_workers, resources at most: up to max_workers)."""
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    start, full, room = [], [], config["max_workers"]
    for node_type in worker_types(config).values():
        start.append((node_type.get("min_workers", 0), node_type["resources"]))
        count = min(node_type.get("max_workers", room), room)
        full.append((count, node_type["resources"]))
        room -= count
    return cluster_resources(head, start), cluster_resources(head, full)


def kuberay_sizes(cluster: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(resources when KubeRay submits the job, resources at most). Without in-tree autoscaling
    the cluster stays at `replicas`."""
    head = pod_ray_resources(cluster["headGroupSpec"])
    groups = cluster["workerGroupSpecs"]
    start = [(g["replicas"], pod_ray_resources(g)) for g in groups]
    scales = cluster.get("enableInTreeAutoscaling", False)
    full = [(g["maxReplicas"] if scales else g["replicas"], pod_ray_resources(g)) for g in groups]
    return cluster_resources(head, start), cluster_resources(head, full)


def train_config(entrypoint_args: list[str]) -> TrainConfig:
    """The TrainConfig `moeforge-train <args>` composes (Hydra overrides, as the job would pass them)."""
    values, _ = compose_values("train", entrypoint_args)
    return TrainConfig.from_dict(values)


def documented_submits(text: str) -> list[tuple[list[str], list[str]]]:
    """Every `ray job submit ... -- moeforge-train ...` in a file's comments, continuation lines
    joined: (the submit options, the moeforge-train overrides)."""
    lines, pending = [], ""
    for line in text.splitlines():
        if not line.startswith("#"):
            continue
        body = line[1:].strip()
        if body.endswith("\\"):
            pending += body[:-1] + " "
            continue
        lines.append(pending + body)
        pending = ""
    submits = []
    for line in lines:
        command = re.match(r"^(?:[A-Z_]+=\S+ )*ray job submit (.*)$", line)  # prose mentions do not match
        if not command:
            continue
        words = shlex.split(command.group(1), comments=True)
        cut = words.index("--")
        assert words[cut + 1] == "moeforge-train", line
        submits.append((words[:cut], words[cut + 2 :]))
    return submits


def fits_problems(
    cfg: TrainConfig, start: dict[str, float], full: dict[str, float], entrypoint_gpus: float
) -> list[str]:
    """Why a cluster of `start` resources that can grow to `full` cannot host this run, if it cannot.

    A pipeline run must pass moeforge's own launch check (check_cluster_fits) against the cluster
    as the job finds it, which waits only with resources.wait_for_autoscaler, and fit the cluster at
    its largest. A one-process run trains in the driver, which needs the GPUs reserved for it."""
    par, res = cfg.parallel, cfg.resources
    if par.schedule == "single":
        needed = math.ceil(res.gpus_per_worker)
        if entrypoint_gpus < needed:
            return [f"one-process run on {needed} GPU(s): the driver must reserve them (entrypoint GPUs)"]
        if full["GPU"] < needed:
            return [f"one-process run on {needed} GPU(s): the cluster has {full['GPU']:g} at most"]
        return []
    problems = []
    for totals, asked in ((start, res), (full, dataclasses.replace(res, wait_for_autoscaler=False))):
        try:
            check_cluster_fits(par, asked, totals)
        except ConfigError as err:
            problems.append(str(err))
    if full["GPU"] < par.world_size * res.gpus_per_worker:
        problems.append(f"{full['GPU']:g} GPUs at most < {par.world_size} workers x {res.gpus_per_worker:g}")
    return problems


# ------------------------------------------------------------------------------------------------
# Ray cluster launcher configs
# ------------------------------------------------------------------------------------------------
def test_the_shipped_cluster_configs_are_found():
    """Found through the moeforge.conf package, where a wheel or an editable install puts them."""
    assert RAY_FILES == ["aws_cpu.yaml", "aws_h100.yaml"]
    assert KUBERAY_FILES == [
        "raycluster.yaml",
        "rayjob-tiny-cpu-dualpipe.yaml",
        "rayjob-v3-671b-2048gpu.yaml",
    ]


@pytest.mark.parametrize("name", RAY_FILES)
def test_ray_config_matches_rays_schema(name):
    assert schema_errors(load_ray(name)) == []


@pytest.mark.parametrize("name", RAY_FILES)
def test_ray_config_passes_what_ray_up_does_before_calling_aws(name):
    """Ray's own preparation: defaults merged (none may leak in), node-type bounds, the schema
    again, and its NetworkInterfaces bootstrap (EFA interfaces carry their subnet and groups)."""
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_ray(name)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_setup_commands"] == config["setup_commands"] + config["head_setup_commands"]
    assert prepared["worker_setup_commands"] == config["setup_commands"] + config["worker_setup_commands"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "file_mounts", "docker"):
        assert prepared[key] == config[key], key
    bootstrapped = _configure_from_network_interfaces(copy.deepcopy(config))
    for node_type in bootstrapped["available_node_types"].values():
        if "NetworkInterfaces" in node_type["node_config"]:
            assert node_type["node_config"]["SubnetIds"] and node_type["node_config"]["SecurityGroupIds"]


@pytest.mark.parametrize("name", RAY_FILES)
def test_node_configs_are_ec2_run_instances_requests(name):
    """Each node_config as Ray's AWS node provider sends it to EC2's RunInstances (SubnetIds resolved
    to one SubnetId, or dropped with the groups when NetworkInterfaces carry them), checked against
    botocore's EC2 model: every field name and type."""
    import botocore.session
    from botocore.validate import ParamValidator

    shape = (
        botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    )
    for node_name, node_type in load_ray(name)["available_node_types"].items():
        request = copy.deepcopy(node_type["node_config"])
        subnets = request.pop("SubnetIds", None)
        if "NetworkInterfaces" in request:
            request.pop("SecurityGroupIds", None)
        elif subnets:
            request["SubnetId"] = subnets[0]
        request.update(MinCount=1, MaxCount=1)
        report = ParamValidator().validate(request, shape)
        assert not report.has_errors(), f"{node_name}: {report.generate_report()}"


@pytest.mark.parametrize("name", RAY_FILES)
def test_head_trains_nothing_and_worker_counts_hold(name):
    assert launcher_problems(load_ray(name)) == []


@pytest.mark.parametrize("name", RAY_FILES)
def test_every_node_installs_moeforge_from_the_checkout(name):
    config = load_ray(name)
    assert config["file_mounts"]["~/moeforge"] == "."
    assert {".venv", ".git"} <= set(config["rsync_exclude"]) and ".gitignore" in config["rsync_filter"]
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*\btorch==", c))
    moeforge_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*-e ~/moeforge$", c))
    assert torch_at < moeforge_at  # torch's build chosen before moeforge's bare `torch` requirement
    cpu_index = any("download.pytorch.org/whl/cpu" in c for c in setup)
    assert cpu_index == (not is_gpu_config(config))


@pytest.mark.parametrize("name", RAY_FILES)
def test_nodes_run_this_ray_and_share_the_auth_token(name):
    """The cluster's Ray is the client's (the image tag), and token auth is on on every node with
    the token `ray up` copies from the launching machine."""
    config = load_ray(name)
    kind = "gpu" if is_gpu_config(config) else "cpu"
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-{kind}"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert re.search(r"export [^;]*\bRAY_AUTH_MODE=token\b", start), key
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


def test_gpu_config_has_8_gpu_p5_workers_on_efa():
    config = load_ray("aws_h100.yaml")
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    (gpu_type,) = [t for t in worker_types(config).values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_type["resources"]["GPU"] == 8 and gpu_type["node_config"]["InstanceType"] == "p5.48xlarge"
    interfaces = gpu_type["node_config"]["NetworkInterfaces"]
    # one EFA interface per network card; the primary one is device 0, the other 31 device 1
    assert [ni["NetworkCardIndex"] for ni in interfaces] == list(range(32))
    assert [ni["DeviceIndex"] for ni in interfaces] == [0] + [1] * 31
    assert {ni["InterfaceType"] for ni in interfaces} == {"efa"}
    # the same subnet and security group as the head: EFA and Ray's ports need traffic within it
    assert {ni["SubnetId"] for ni in interfaces} == set(head["SubnetIds"])
    assert {g for ni in interfaces for g in ni["Groups"]} == set(head["SecurityGroupIds"])
    assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(gpu_type["node_config"])
    assert config["provider"]["use_internal_ips"] is True  # multi-interface instances get no public IP
    worker_options = " ".join(config["docker"]["worker_run_options"])
    assert "--device=/dev/infiniband" in worker_options and "memlock=-1" in worker_options
    assert "/opt/amazon:/opt/amazon" in worker_options
    assert "infiniband" not in " ".join(config["docker"]["run_options"])  # the head has no EFA
    worker_start = next(c for c in config["worker_start_ray_commands"] if "ray start" in c)
    assert "FI_PROVIDER=efa" in worker_start and "/opt/amazon/ofi-nccl/lib" in worker_start


@pytest.mark.parametrize("name", RAY_FILES)
def test_documented_jobs_compose_and_fit_the_launcher_cluster(name):
    """The `ray job submit` commands in the file's comments compose into a TrainConfig (moeforge's
    own config path) and fit: aws_cpu the tiny DualPipe run, aws_h100 the 2,048-GPU V3 run and the
    one-GPU small run."""
    text = (RAY_DIR / name).read_text()
    start, full = launcher_sizes(yaml.safe_load(text))
    submits = documented_submits(text)
    presets = set()
    for options, args in submits:
        cfg = train_config(args)
        presets.add(cfg.run.name)
        gpus = (
            float(options[options.index("--entrypoint-num-gpus") + 1])
            if "--entrypoint-num-gpus" in options
            else 0
        )
        assert fits_problems(cfg, start, full, gpus) == [], args
    expected = {"aws_cpu.yaml": {"tiny_cpu_dualpipe"}, "aws_h100.yaml": {"v3_671b_2048gpu", "small_1gpu_fp8"}}
    assert presets == expected[name]


@pytest.mark.parametrize(
    "path, value",
    [
        (["max_workers"], "many"),
        (["available_node_types", "cpu_worker", "min_worker"], 1),  # misspelt key
        (["available_node_types", "cpu_worker", "resources", "CPU"], 0.5),  # Ray wants integers here
        (["docker", "imag"], "rayproject/ray"),
        (["provider"], {"region": "us-west-2"}),  # no provider type
    ],
)
def test_a_broken_copy_fails_schema_validation(path, value):
    """The validator runs and the schema is strict: a copy of aws_cpu.yaml with one bad field fails."""
    config = load_ray("aws_cpu.yaml")
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert schema_errors(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


def test_a_head_that_could_train_is_caught():
    config = load_ray("aws_h100.yaml")
    config["available_node_types"]["head"]["resources"] = {"CPU": 32, "GPU": 8}
    config["available_node_types"]["gpu_worker"]["min_workers"] = 300
    problems = launcher_problems(config)
    assert any(p.startswith("head: resources") for p in problems)
    assert any("min_workers (300) <= max_workers (256)" in p for p in problems)


# ------------------------------------------------------------------------------------------------
# KubeRay manifests
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_manifest_has_what_kuberay_needs(name):
    docs = load_kuberay(name)
    assert len(docs) == 1
    assert kuberay_problems(docs[0]) == []


def test_raycluster_autoscales_8_gpu_workers_from_zero():
    (doc,) = load_kuberay("raycluster.yaml")
    spec = doc["spec"]
    assert doc["kind"] == "RayCluster" and spec["enableInTreeAutoscaling"] is True
    assert isinstance(spec["autoscalerOptions"], dict) and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    (group,) = spec["workerGroupSpecs"]
    assert pod_ray_resources(group)["GPU"] == 8
    assert group["minReplicas"] == group["replicas"] == 0 and group["maxReplicas"] > 0


@pytest.mark.parametrize("name", [n for n in KUBERAY_FILES if n.startswith("rayjob-")])
def test_rayjob_cluster_hosts_its_preset(name):
    """maxReplicas x GPUs (and CPUs) per pod cover what the entrypoint's composed TrainConfig needs
    (pp x dp workers x resources.gpus_per_worker), and moeforge's launch check passes on the cluster
    KubeRay hands the job."""
    (doc,) = load_kuberay(name)
    spec = doc["spec"]
    args = shlex.split(spec["entrypoint"])
    cfg = train_config(args[1:])
    assert name == f"rayjob-{cfg.run.name.replace('_', '-')}.yaml"  # one job per preset, named after it
    cluster = spec["rayClusterSpec"]
    start, full = kuberay_sizes(cluster)
    assert fits_problems(cfg, start, full, float(spec.get("entrypointNumGpus", 0))) == []
    max_gpus = sum(g["maxReplicas"] * pod_ray_resources(g)["GPU"] for g in cluster["workerGroupSpecs"])
    assert max_gpus >= cfg.parallel.world_size * cfg.resources.gpus_per_worker


def test_v3_rayjob_is_2048_gpus_in_256_pods():
    (doc,) = load_kuberay("rayjob-v3-671b-2048gpu.yaml")
    cfg = train_config(shlex.split(doc["spec"]["entrypoint"])[1:])
    assert (cfg.parallel.pp, cfg.parallel.dp, cfg.resources.gpus_per_worker) == (16, 128, 1)
    (group,) = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 256
    assert pod_ray_resources(group)["GPU"] * 256 == cfg.parallel.world_size * cfg.resources.gpus_per_worker


def test_raycluster_documented_job_composes_and_fits():
    text = (KUBERAY_DIR / "raycluster.yaml").read_text()
    (doc,) = yaml.safe_load_all(text)
    start, full = kuberay_sizes(doc["spec"])
    ((_options, args),) = documented_submits(text)
    cfg = train_config(args)
    assert cfg.resources.gpus_per_worker == 1 and cfg.resources.wait_for_autoscaler
    assert fits_problems(cfg, start, full, 0.0) == []


def test_mismatched_gpu_requests_and_a_too_small_job_cluster_are_caught():
    (doc,) = load_kuberay("rayjob-v3-671b-2048gpu.yaml")
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 4
    assert any("nvidia.com/gpu requests 8 != limits 4" in p for p in kuberay_problems(doc))
    group["replicas"] = group["minReplicas"] = group["maxReplicas"] = 16  # 128 GPUs
    cfg = train_config(shlex.split(doc["spec"]["entrypoint"])[1:])
    start, full = kuberay_sizes(doc["spec"]["rayClusterSpec"])
    problems = fits_problems(cfg, start, full, 0.0)
    assert problems and "the run needs 2048 GPUs" in problems[0]


# moeforge's subset of the KubeRay v1 CRDs: the fields its manifests use, with KubeRay's types.
KUBERAY_CRD_SUBSET = os.path.join(os.path.dirname(__file__), "data", "kuberay")


def kuberay_crd_dir() -> str:
    """Where the CRDs come from: KUBERAY_CRD_DIR (the operator's full CRDs) when set, else the subset."""
    return os.environ.get("KUBERAY_CRD_DIR") or KUBERAY_CRD_SUBSET


@functools.cache
def crd_schema(kind: str, crd_dir: str) -> dict:
    """The v1 openAPIV3Schema of the CRD for `kind` in `crd_dir`, with unknown fields made errors (the
    API server would silently drop them, so a misspelt field would otherwise pass)."""

    def strict(node):
        if isinstance(node, dict):
            closed = node.get("type") == "object" and "properties" in node
            open_ended = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
            if closed and not open_ended:
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    plural = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}[kind]
    with open(os.path.join(crd_dir, f"ray.io_{plural}.yaml")) as f:
        crd = yaml.safe_load(f)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    strict(schema)
    return schema


def crd_errors(doc: dict, crd_dir: str) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(doc["kind"], crd_dir))
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_manifest_matches_the_operators_crd(name):
    for doc in load_kuberay(name):
        assert crd_errors(doc, kuberay_crd_dir()) == []


def rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def worker_container(doc: dict) -> dict:
    return kuberay_cluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


UNEXPECTED = "Additional properties are not allowed ({!r} was unexpected)"


@pytest.mark.parametrize(
    "name, change, path, message",
    [
        (
            "raycluster.yaml",
            lambda doc: rename(doc["spec"], "workerGroupSpecs", "workerGroupSpec"),
            ["spec"],
            UNEXPECTED.format("workerGroupSpec"),
        ),
        (
            "rayjob-v3-671b-2048gpu.yaml",
            lambda doc: rename(kuberay_cluster_spec(doc)["headGroupSpec"], "rayStartParams", "rayStartParam"),
            ["spec", "rayClusterSpec", "headGroupSpec"],
            UNEXPECTED.format("rayStartParam"),
        ),
        (
            "rayjob-tiny-cpu-dualpipe.yaml",
            lambda doc: rename(worker_container(doc), "envFrom", "envfrom"),
            ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0],
            UNEXPECTED.format("envfrom"),
        ),
        (
            "rayjob-v3-671b-2048gpu.yaml",
            lambda doc: kuberay_cluster_spec(doc)["workerGroupSpecs"][0].update(replicas="256"),
            ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"],
            "'256' is not of type 'integer'",
        ),
    ],
    ids=["misspelt-workerGroupSpecs", "misspelt-rayStartParams", "misspelt-envFrom", "string-replicas"],
)
def test_the_crd_check_catches_a_misspelt_field_and_a_wrong_type(name, change, path, message):
    """A field the subset does not know (a misspelt one) and a value of the wrong type are errors
    with the subset, and with the operator's CRDs when KUBERAY_CRD_DIR is set."""
    (doc,) = load_kuberay(name)
    change(doc)
    for crd_dir in dict.fromkeys([KUBERAY_CRD_SUBSET, kuberay_crd_dir()]):
        assert crd_errors(doc, crd_dir) == [f"{path}: {message}"], crd_dir


# ------------------------------------------------------------------------------------------------
# Hydra composition beside conf/clusters/
# ------------------------------------------------------------------------------------------------
def test_hydra_sees_the_folder_as_a_group_that_no_config_selects():
    """conf/clusters/ is a Hydra config group (clusters/ray and clusters/kuberay), but composing
    conf/train.yaml picks nothing from it, and `moeforge-train --help` does not offer it."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_module(config_module="moeforge.conf", version_base=None):
        loader = GlobalHydra.instance().config_loader()
        assert loader.get_group_options("clusters/ray") == ["aws_cpu", "aws_h100"]
    values, choices = compose_values("train", ["experiment=tiny_cpu_single"])
    assert not [group for group in choices if group.startswith("clusters")]
    assert not {"ray", "kuberay", "provider", "cluster_name"} & set(values.get("cluster") or {})
    assert TrainConfig.from_dict(values).run.name == "tiny_cpu_single"


def test_estimate_cluster_section_stays_its_own():
    """conf/estimate.yaml's `cluster:` (GPUs, peak, MFU, price) composes as before: a dotted override
    sets a value in it, nothing of conf/clusters/ is merged in."""
    own = yaml.safe_load((CONF / "estimate.yaml").read_text())["cluster"]
    values, _ = compose_values("estimate", ["model=tiny", "cluster.gpus=8"])
    assert values["cluster"] == {**own, "gpus": 8}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [ESTIMATE, "model=tiny", "tokens=1e9", "cluster.gpus=8", "format=json"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cost"]["cluster"]["gpus"] == 8
