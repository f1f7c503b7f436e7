"""The files in deploy/, checked offline with the validators of the tools that read them.

- ``ray up`` cluster YAMLs: Ray's own ``prepare_config`` (merge the provider's defaults, merge
  setup commands, check docker, fill node-type worker bounds) then ``validate_config``
  (ray-schema.json plus its cross-field checks): what ``ray up`` runs before its first cloud
  call. No cloud is contacted, so AMIs, images, quotas and IAM are not checked here.
- The kiln configs: ``load_job`` and ``ServeConfig``, the loaders ``kiln train --config`` and
  ``kiln serve --config`` use.
- The Serve config: Serve's ``ServeDeploySchema``, and the application its import path builds.
- KubeRay manifests: structure checked by hand (no KubeRay CRD schema ships in a pip package).

Across files: one Ray version everywhere, the gateway pinned to the head, GPUs on workers, the
job fitting the cluster, port 50051 never open to the world, and the installed wheel carrying
every package and dependency a node imports.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata as md
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs" / "deploy.md"
CLUSTER_YAMLS = ["aws.yaml", "gcp.yaml"]
KUBERAY = DEPLOY / "kuberay"
RAYJOBS = ["rayjob-up.yaml", "rayjob-train.yaml"]
GATEWAY_RESOURCE = "kiln_gateway"
PENDING_SERVE_FIELDS = {"gateway_resources"}
"""serve.yaml fields that ServeConfig does not have yet (asked for in the deploy report)."""
OPEN_TO_ALL = {"0.0.0.0/0", "::/0"}


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def prepared(name: str) -> dict[str, Any]:
    """The cluster config as ``ray up`` sees it after filling in Ray's defaults."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(load(name))


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {k: v for k, v in config["available_node_types"].items() if k != head}


def serve_section() -> dict[str, Any]:
    return load("serve.yaml")["serve"]


def serve_config_app() -> dict[str, Any]:
    (app,) = load("serve_config.yaml")["applications"]
    return app


def raycluster() -> dict[str, Any]:
    (doc,) = [d for d in load_all(KUBERAY / "raycluster.yaml") if d["kind"] == "RayCluster"]
    return doc


def ray_version() -> str:
    import ray

    return ray.__version__


# --------------------------------------------------------------------------------------------
# `ray up` cluster YAMLs


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_passes_rays_own_validation(name: str) -> None:
    from ray.autoscaler._private.util import validate_config

    config = prepared(name)
    validate_config(config)
    assert config["available_node_types"][config["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        (lambda c: c["available_node_types"]["head"]["resources"].update(GPU=0.5), "jsonschema"),
        (lambda c: c.update(max_worker=4), "jsonschema"),  # a typo of max_workers
        (lambda c: c.update(head_node_type="nope"), ValueError),
        (lambda c: c.update(max_workers=0), ValueError),  # below the sum of min_workers
    ],
    ids=["fractional-resource", "unknown-key", "missing-head-type", "min-over-max"],
)
def test_rays_validation_rejects_a_broken_config(breakage: Any, error: Any) -> None:
    """The validator is live: the same file, broken in one place, is refused."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    config = prepared("aws.yaml")
    breakage(config)
    with pytest.raises(jsonschema.ValidationError if error == "jsonschema" else error):
        validate_config(config)


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_gateway_on_the_head_and_gpus_on_the_workers(name: str) -> None:
    config = load(name)
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    assert head.get("GPU", 0) == 0, "the head runs no CUDA: GPUs belong to worker node types"
    assert head.get(GATEWAY_RESOURCE) == 1, "the head must advertise the gateway's resource"
    for kind, node in worker_types(config).items():
        assert node["resources"].get("GPU", 0) >= 1, f"{kind} has no GPU"
        assert GATEWAY_RESOURCE not in node["resources"], f"{kind} could host the gateway"


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_fits_the_job(name: str) -> None:
    """Training and serving fit at full scale, serving fits at minimum size, and a GPU node has
    the CPUs for one training worker or replica per GPU (else GPUs sit idle waiting for CPUs)."""
    from kilnlm.cluster.config import load_job

    job = load_job(DEPLOY / "train.yaml").cluster
    serve = serve_section()
    nodes = worker_types(load(name))
    gpus_max = sum(n["max_workers"] * n["resources"]["GPU"] for n in nodes.values())
    gpus_min = sum(n.get("min_workers", 0) * n["resources"]["GPU"] for n in nodes.values())
    assert job.workers + serve["max_replicas"] * serve["replica_num_gpus"] <= gpus_max
    assert serve["min_replicas"] * serve["replica_num_gpus"] <= gpus_min
    cpus_per_gpu = max(job.cpus_per_worker, serve["replica_num_cpus"])
    for kind, node in nodes.items():
        assert node["resources"]["CPU"] >= node["resources"]["GPU"] * cpus_per_gpu, kind


def test_gateway_port_open_only_to_a_named_range_on_aws() -> None:
    rules = load("aws.yaml")["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(serve_section()["port"],) * 2]
    ranges = [r["CidrIp"] for rule in rules for r in rule.get("IpRanges", [])]
    ranges += [r["CidrIpv6"] for rule in rules for r in rule.get("Ipv6Ranges", [])]
    assert ranges and not OPEN_TO_ALL & set(ranges)


def test_gateway_firewall_rule_on_gcp_targets_the_head_only() -> None:
    """GCP's provider opens no ports: docs/deploy.md's rule must target the head's tag only."""
    config = load("gcp.yaml")
    tags = {
        kind: set(node["node_config"].get("tags", {}).get("items", []))
        for kind, node in config["available_node_types"].items()
    }
    (tag,) = tags[config["head_node_type"]]
    assert all(tag not in t for k, t in tags.items() if k != config["head_node_type"])
    rule = shell_command(DOCS.read_text(), "gcloud compute firewall-rules create")
    assert f"--target-tags={tag}" in rule
    assert f"--allow=tcp:{serve_section()['port']}" in rule
    (source,) = re.findall(r"--source-ranges=(\S+)", rule)
    assert source not in OPEN_TO_ALL


def shell_command(text: str, start: str) -> str:
    """The first command in ``text`` that begins with ``start``, continuation lines joined."""
    at = text.find(start)
    assert at >= 0, f"docs/deploy.md has no `{start}` command"
    lines = []
    for line in text[at:].splitlines():
        lines.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            return " ".join(lines)
    return " ".join(lines)


def test_gcp_gpu_nodes_stop_for_host_maintenance() -> None:
    """GPU VMs cannot live-migrate; `scheduling` is an object in the Compute API, not a list."""
    for kind, node in worker_types(load("gcp.yaml")).items():
        assert node["node_config"]["scheduling"] == {"onHostMaintenance": "TERMINATE"}, kind


def test_one_ray_version_everywhere() -> None:
    """The laptop's Ray (which runs `ray up`), the images and the pins on the nodes agree."""
    version = ray_version()
    images = [load(n)["docker"][k] for n in CLUSTER_YAMLS for k in ("head_image", "worker_image")]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    images += re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert images and all(i.startswith(f"rayproject/ray:{version}-py311") for i in images), images
    pins = [c for n in CLUSTER_YAMLS for c in load(n)["setup_commands"] if "kilnlm-" in c]
    pins.append(dockerfile)
    assert all(f'"ray[serve,train]=={version}"' in p for p in pins)
    assert raycluster()["spec"]["rayVersion"] == version


def test_one_torch_everywhere() -> None:
    """Nodes install the torch the Makefile pins for development (the CPU build locally)."""
    pinned = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    commands = [c for n in CLUSTER_YAMLS for c in load(n)["setup_commands"]]
    commands.append((DEPLOY / "Dockerfile").read_text())
    found = {v for c in commands for v in re.findall(r'"torch==([\d.]+)"', c)}
    assert found == {pinned}


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_file_mounts_ship_the_wheel_and_the_configs(name: str) -> None:
    """setup_commands install the mounted wheel; the configs the jobs read are mounted."""
    config = load(name)
    mounts = config["file_mounts"]
    assert (ROOT / mounts["/home/ray/kiln/deploy"]).resolve() == DEPLOY
    wheel_dir = next(remote for remote, local in mounts.items() if Path(local).name == "dist")
    assert any(f"{wheel_dir}/kilnlm-*.whl" in c for c in config["setup_commands"])
    assert "-w dist ." in DOCS.read_text(), "docs/deploy.md must build the wheel into dist/"


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_corpus_is_mounted_where_the_job_reads_it(name: str) -> None:
    """Workers memory-map the shards, so data_dir must be a local folder on every node."""
    from kilnlm.cluster.config import load_job

    data_dir = load_job(DEPLOY / "train.yaml").data_dir
    local = load(name)["file_mounts"][data_dir]
    assert f"build_corpus(CorpusConfig(), '{Path(local).as_posix().removeprefix('./')}'" in (
        DOCS.read_text()
    )


# --------------------------------------------------------------------------------------------
# The kiln configs the jobs read


def test_train_yaml_is_a_valid_gpu_job() -> None:
    from kilnlm.cluster.config import load_job

    job = load_job(DEPLOY / "train.yaml")
    assert job.cluster.use_gpu is True
    assert job.cluster.storage_path.startswith(("s3://", "gs://")), "nodes share no local disk"
    assert job.data_dir is not None, "with a bucket storage_path the launcher needs data_dir"
    assert job.train.seq_len <= job.model_config(vocab_size=256).block_size


def test_serve_yaml_is_a_valid_serve_config() -> None:
    from kilnlm.config import from_dict
    from kilnlm.serving_config import ServeConfig

    data = dict(serve_section())
    known = {f.name for f in fields(ServeConfig)}
    assert set(data) - known <= PENDING_SERVE_FIELDS, f"unknown fields {set(data) - known}"
    config = from_dict(ServeConfig, {k: v for k, v in data.items() if k in known})
    assert config.replica_num_gpus >= 1 and config.host == "0.0.0.0"


def test_serve_gateway_resources_pin_the_gateway_to_the_head() -> None:
    from kilnlm.config import from_dict
    from kilnlm.serving_config import ServeConfig

    config = from_dict(ServeConfig, serve_section())
    options = deployment_options(build(config))
    assert options["Gateway"].get("resources") == {GATEWAY_RESOURCE: 1}


# --------------------------------------------------------------------------------------------
# The Serve config file


def build(config: Any) -> Any:
    """Serve's own build step (no cluster needed): the app's deployments with their options."""
    from ray.serve._private.build_app import build_app

    from kilnlm.actors import serve_app

    return build_app(serve_app.build_app(config), name=config.app_name)


def deployment_options(built: Any) -> dict[str, dict[str, Any]]:
    return {d.name: d.ray_actor_options for d in built.deployments}


def test_serve_config_passes_serves_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(load("serve_config.yaml"))
    assert schema.proxy_location == "Disabled"


def test_serve_config_matches_serve_yaml_and_names_real_deployments() -> None:
    """Same settings as serve.yaml (the gateway's pin as Serve's per-deployment override), and
    every overridden deployment exists in the application serve_app builds from them."""
    from kilnlm.config import from_dict
    from kilnlm.serving_config import ServeConfig

    app = serve_config_app()
    serve = dict(serve_section())
    pin = serve.pop("gateway_resources")
    assert app["args"] == serve
    (gateway,) = [d for d in app["deployments"] if d["name"] == "Gateway"]
    assert gateway["ray_actor_options"] == {"num_cpus": serve["gateway_num_cpus"], "resources": pin}
    names = set(deployment_options(build(from_dict(ServeConfig, app["args"]))))
    assert {d["name"] for d in app["deployments"]} <= names


def test_serve_config_import_path_builds_the_app() -> None:
    from ray import serve

    module_name, attr = serve_config_app()["import_path"].split(":")
    module = importlib.import_module(module_name)  # actors/serve_app.py must exist
    app = getattr(module, attr)(copy.deepcopy(serve_config_app()["args"]))
    assert isinstance(app, serve.Application)


# --------------------------------------------------------------------------------------------
# KubeRay manifests (structure by hand: no CRD schema in a pip package)


def test_kuberay_manifests_name_their_kinds() -> None:
    kinds = {}
    for path in KUBERAY.glob("*.yaml"):
        for doc in load_all(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
            kinds[doc["kind"]] = doc["apiVersion"]
    assert kinds == {
        "ServiceAccount": "v1",
        "RayCluster": "ray.io/v1",
        "Service": "v1",
        "RayJob": "ray.io/v1",
    }


def container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]


def test_raycluster_head_hosts_the_gateway_with_its_secrets() -> None:
    head = raycluster()["spec"]["headGroupSpec"]
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values()), "KubeRay wants string values"
    assert json.loads(json.loads(params["resources"])) == {GATEWAY_RESOURCE: 1}
    assert params["num-gpus"] == "0"
    c = container(head["template"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == serve_section()["port"]
    env = {e["name"]: e for e in c["env"]}
    assert "value" not in env["KILN_ADMIN_TOKEN"], "the admin token must come from a Secret"
    assert env["KILN_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "kiln-admin"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    assert volumes[mounts["/home/ray/kiln/deploy"]]["configMap"]["name"] == "kiln-config"


def pod_templates() -> list[dict[str, Any]]:
    spec = raycluster()["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_every_pod_fetches_the_corpus_from_the_bucket() -> None:
    """Each pod copies <storage>/corpus into data_dir before Ray starts, from the same storage
    path as every other container and as train.yaml."""
    from kilnlm.cluster.config import load_job

    job = load_job(DEPLOY / "train.yaml")
    for template in pod_templates():
        spec = template["spec"]
        (init,) = spec["initContainers"]
        everyone = [init, *spec["containers"]]
        paths = {e["value"] for c in everyone for e in c["env"] if e["name"] == "KILN_STORAGE_PATH"}
        assert paths == {job.cluster.storage_path}
        assert 'os.environ["KILN_STORAGE_PATH"] + "/corpus"' in init["command"][-1]
        assert f'"{job.data_dir}"' in init["command"][-1]
        for c in (init, container(template)):
            assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}[job.data_dir] == "data"
    assert "s3://YOUR_BUCKET/kiln/corpus" in DOCS.read_text()


def test_raycluster_gpu_workers() -> None:
    from kilnlm.cluster.config import load_job

    (group,) = raycluster()["spec"]["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    res = container(group["template"])["resources"]
    gpus = int(res["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    job = load_job(DEPLOY / "train.yaml").cluster
    serve = serve_section()
    cpus_per_gpu = max(job.cpus_per_worker, serve["replica_num_cpus"])
    assert float(res["limits"]["cpu"]) >= gpus * cpus_per_gpu
    assert (
        job.workers + serve["max_replicas"] * serve["replica_num_gpus"]
        <= group["maxReplicas"] * gpus
    )


def test_grpc_service_selects_the_head_pod() -> None:
    (svc,) = [d for d in load_all(KUBERAY / "raycluster.yaml") if d["kind"] == "Service"]
    name = raycluster()["metadata"]["name"]
    assert svc["spec"]["selector"] == {"ray.io/cluster": name, "ray.io/node-type": "head"}
    if svc["spec"].get("type", "ClusterIP") != "ClusterIP":  # reachable from outside
        ranges = svc["spec"].get("loadBalancerSourceRanges", [])
        assert ranges and not OPEN_TO_ALL & set(ranges), "name the clients' range"
    (port,) = svc["spec"]["ports"]
    assert port["port"] == serve_section()["port"] and port["targetPort"] == "grpc"


def test_kuberay_images_are_this_release() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for t in pod_templates() for c in t["spec"]["containers"]}
    images |= {c["image"] for t in pod_templates() for c in t["spec"]["initContainers"]}
    assert {image.rsplit(":", 1)[1] for image in images} == {version}


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_runs_on_the_raycluster_with_mounted_configs(name: str) -> None:
    (job,) = load_all(KUBERAY / name)
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": raycluster()["metadata"]["name"]}
    assert "rayClusterSpec" not in job["spec"], (
        "clusterSelector and rayClusterSpec exclude each other"
    )
    for path in re.findall(r"/home/ray/kiln/deploy/(\S+?\.yaml)", job["spec"]["entrypoint"]):
        assert (DEPLOY / path).is_file(), path


def fake_kiln(bin_dir: Path) -> None:
    """A `kiln` on PATH that prints the arguments it got (to see what the shells made of them)."""
    bin_dir.mkdir()
    script = bin_dir / "kiln"
    script.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    script.chmod(0o755)


def through_kuberay_and_ray(entrypoint: str, bin_dir: Path) -> list[str]:
    """The entrypoint's path to the head: KubeRay pastes it into a shell line of the submitter
    pod (ray-operator/controllers/ray/common/job.go), `ray job submit` joins what that shell
    gave it with shlex.join (ray/dashboard/modules/job/cli.py), and the head runs the result
    with shell=True in the head container's environment (job_supervisor.py)."""
    ray_job_submit = f"{sys.executable} -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))'"
    submitter = subprocess.run(
        ["bash", "-c", f"{ray_job_submit} {entrypoint} ;"],
        env={"PATH": "/usr/bin:/bin"},  # the submitter pod: no KILN_STORAGE_PATH
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    head_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "KILN_STORAGE_PATH": "s3://bucket/kiln"}
    out = subprocess.run(
        submitter, shell=True, env=head_env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_expands_the_storage_path_on_the_head(name: str, tmp_path: Path) -> None:
    fake_kiln(tmp_path / "bin")
    (job,) = load_all(KUBERAY / name)
    argv = through_kuberay_and_ray(job["spec"]["entrypoint"], tmp_path / "bin")
    assert argv[argv.index("--storage-path") + 1] == "s3://bucket/kiln"
    from kilnlm.cli import build_parser

    parser = build_parser()
    (commands,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert argv[0] in commands, f"`kiln {argv[0]}` is not registered"
    parser.parse_args(argv)  # every flag exists (argparse exits on an unknown one)


def test_unquoted_storage_path_would_be_lost_in_the_submitter(tmp_path: Path) -> None:
    """Why the entrypoints quote: without `sh -c '...'` the submitter pod expands the variable."""
    fake_kiln(tmp_path / "bin")
    argv = through_kuberay_and_ray(
        'kiln train --storage-path "$KILN_STORAGE_PATH"', tmp_path / "bin"
    )
    assert argv[argv.index("--storage-path") + 1] == ""


# --------------------------------------------------------------------------------------------
# Across files


def test_every_value_to_fill_in_is_documented() -> None:
    docs = DOCS.read_text()
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    tokens = {t for p in files for t in re.findall(r"YOUR_[A-Z_]+", p.read_text())}
    assert tokens and tokens <= set(re.findall(r"YOUR_[A-Z_]+", docs)), tokens
    for p in files:
        assert str(p.relative_to(ROOT)) in docs, f"docs/deploy.md never mentions {p.name}"


def test_installed_wheel_carries_every_package() -> None:
    """Nodes install the wheel, not the work tree: every package folder must be in it."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {pkg: Path(d) for pkg, d in setup["package-dir"].items()}
    on_disk = set()
    for pkg, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join((pkg, *rel)))
    missing = on_disk - set(setup["packages"])
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


def declared_closure() -> set[str]:
    """Distributions that `pip install kilnlm` brings: the dependencies and theirs, with extras."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo, seen = [Requirement(d) for d in deps], set()
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:
            continue
        for sub in map(Requirement, requires):
            extras = ["", *sorted(req.extras)]
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return {name for name, _ in seen}


def module_level_imports() -> set[str]:
    """Top-level names imported at module level (not inside functions or try) by the package."""
    import ast

    names = set()
    for folder in ("kilnlm", "cluster", "actors"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"kilnlm", "__future__"}


def test_declared_dependencies_cover_every_import() -> None:
    """A node's `pip install kilnlm-*.whl` must bring every module the code imports on load."""
    from packaging.utils import canonicalize_name

    closure = declared_closure()
    providers = md.packages_distributions()
    uncovered = {
        m: providers.get(m)
        for m in module_level_imports()
        if not {canonicalize_name(d) for d in providers.get(m, [])} & closure
    }
    assert not uncovered, f"add to [project] dependencies in pyproject.toml: {uncovered}"


def test_shell_lines_in_the_cluster_yamls_parse() -> None:
    """Every setup and start command is one valid shell line (a YAML fold can break quoting)."""
    for name in CLUSTER_YAMLS:
        config = load(name)
        keys = [k for k in config if k.endswith("_commands")]
        for line in (c for k in keys for c in config[k]):
            shlex.split(line)
            subprocess.run(["bash", "-n", "-c", line], check=True)
