"""Validate the deployment recipes under deploy/ without a Docker engine or a Kubernetes cluster.

Checked here: every YAML parses; KubeRay resources carry the fields the operator needs and agree
with each other (MLflow service, checkpoint volume, Ray version, GPU capacity for the config);
the RayJob entrypoint names a script and a config that exist and load; the cluster-launcher YAML
passes Ray's own validation; the Dockerfile starts FROM an official Ray image and installs the
project; nothing secret-looking is committed; and the local MLflow server script really starts,
serves the tracking API (runs, metrics, proxied artifacts) and stops its whole process group.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S_DIRS = [DEPLOY / "kuberay", DEPLOY / "mlflow" / "k8s"]
START_SCRIPT = DEPLOY / "mlflow" / "start-server.sh"
STOP_SCRIPT = DEPLOY / "mlflow" / "stop-server.sh"
OFFICIAL_RAY_IMAGE = re.compile(r"^rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(cpu|gpu|cu\d+)$")


# ----------------------------------------------------------------------------- helpers


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _doc(rel: str, kind: str) -> dict[str, Any]:
    matches = [d for d in _docs(DEPLOY / rel) if d.get("kind") == kind]
    assert len(matches) == 1, f"deploy/{rel}: expected one {kind}, found {len(matches)}"
    return matches[0]


def _ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """The RayCluster spec and the RayJob's embedded cluster spec: both are checked alike."""
    cluster = _doc("kuberay/raycluster.yaml", "RayCluster")
    job = _doc("kuberay/rayjob.yaml", "RayJob")
    return [("raycluster.yaml", cluster["spec"]), ("rayjob.yaml", job["spec"]["rayClusterSpec"])]


def _groups(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    containers = group["template"]["spec"]["containers"]
    assert containers, "pod template has no containers"
    return containers[0]  # KubeRay treats the first container as the Ray container


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _dockerfile_from() -> str:
    """The FROM image of deploy/Dockerfile with ARG defaults substituted."""
    args: dict[str, str] = {}
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if m := re.match(r"^ARG\s+(\w+)=(\S+)", line):
            args.setdefault(m.group(1), m.group(2))
        if m := re.match(r"^FROM\s+(\S+)", line):
            return re.sub(r"\$\{(\w+)\}", lambda v: args[v.group(1)], m.group(1))
    raise AssertionError("deploy/Dockerfile has no FROM line")


def _mlflow_server_args() -> dict[str, str]:
    container = _ray_container(
        {"template": _doc("mlflow/k8s/mlflow.yaml", "Deployment")["spec"]["template"]}
    )
    return dict(a[2:].split("=", 1) for a in container["args"] if a.startswith("--") and "=" in a)


# ----------------------------------------------------------------------------- YAML basics

ALL_YAML = sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.yaml"))


def test_deploy_has_the_expected_recipes() -> None:
    expected = {
        "cluster-launcher.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/storage.yaml",
        "mlflow/k8s/mlflow.yaml",
        "mlflow/k8s/postgres.yaml",
        "mlflow/k8s/minio.yaml",
        "mlflow/k8s/secrets.template.yaml",
    }
    assert expected <= set(ALL_YAML)


@pytest.mark.parametrize("rel", ALL_YAML)
def test_every_yaml_parses_into_mappings(rel: str) -> None:
    docs = _docs(DEPLOY / rel)
    assert docs, f"deploy/{rel} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"deploy/{rel}: a document is {type(doc).__name__}"
        if any((DEPLOY / rel).is_relative_to(d) for d in K8S_DIRS):
            missing = {"apiVersion", "kind"} - set(doc)
            assert not missing, f"deploy/{rel}: {doc.get('kind')} lacks {missing}"
            if doc["kind"] != "Kustomization":
                assert doc.get("metadata", {}).get("name"), f"deploy/{rel}: unnamed {doc['kind']}"


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = _docs(DEPLOY / "mlflow/k8s/kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    present = {p.name for p in (DEPLOY / "mlflow/k8s").glob("*.yaml")}
    assert listed <= present, f"kustomization lists missing files: {listed - present}"
    assert present - listed == {"kustomization.yaml", "secrets.template.yaml"}


# ----------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("source,spec", _ray_cluster_specs(), ids=["raycluster", "rayjob"])
def test_ray_cluster_spec_is_complete(source: str, spec: dict[str, Any]) -> None:
    assert spec["headGroupSpec"]["template"]["spec"]["containers"], source
    assert spec["workerGroupSpecs"], f"{source}: no worker groups"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{source}: token auth is off"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", (
        f"{source}: the job API (8265) has no auth of its own; keep the head Service internal"
    )
    for name, group in _groups(spec):
        container = _ray_container(group)
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), (
                f"{source}: group {name!r} needs cpu and memory {kind}"
            )
        if name != "head":
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (
                f"{source}: group {name!r} replicas outside [minReplicas, maxReplicas]"
            )
        # Kubernetes rejects extended resources whose request differs from the limit.
        gpu_request = resources.get("requests", {}).get("nvidia.com/gpu")
        if gpu_request is not None:
            assert int(gpu_request) == _gpus(container), f"{source}: {name!r} GPU req != limit"
    gpu_groups = [n for n, g in _groups(spec) if _gpus(_ray_container(g)) > 0]
    assert gpu_groups, f"{source}: no worker group requests nvidia.com/gpu"
    assert "head" not in gpu_groups, f"{source}: the head should not hold a GPU"


def test_raycluster_has_cpu_and_gpu_worker_groups() -> None:
    spec = _doc("kuberay/raycluster.yaml", "RayCluster")["spec"]
    gpus = {g["groupName"]: _gpus(_ray_container(g)) for g in spec["workerGroupSpecs"]}
    assert any(n == 0 for n in gpus.values()), f"no CPU-only worker group: {gpus}"
    assert any(n > 0 for n in gpus.values()), f"no GPU worker group: {gpus}"


@pytest.mark.parametrize("source,spec", _ray_cluster_specs(), ids=["raycluster", "rayjob"])
def test_ray_pods_use_the_project_image_and_shared_checkpoint_volume(
    source: str, spec: dict[str, Any]
) -> None:
    pvc = _doc("kuberay/storage.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "checkpoints must be visible to all pods"
    for name, group in _groups(spec):
        container = _ray_container(group)
        image = container["image"]
        assert "/contrastive-service:" in image, f"{source}: {name!r} runs {image}"
        flavour = "gpu" if _gpus(container) else "cpu"
        assert image.endswith(f"-{flavour}"), f"{source}: {name!r} should use the {flavour} image"
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in group["template"]["spec"].get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        assert pvc["metadata"]["name"] in claims.values(), f"{source}: {name!r} lacks the PVC"
        assert any(mounts.get(v) for v, c in claims.items() if c == pvc["metadata"]["name"])


@pytest.mark.parametrize("source,spec", _ray_cluster_specs(), ids=["raycluster", "rayjob"])
def test_ray_pods_point_at_the_in_cluster_mlflow_service(source: str, spec: dict[str, Any]) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    service = _doc("mlflow/k8s/mlflow.yaml", "Service")
    namespace = _docs(DEPLOY / "mlflow/k8s/kustomization.yaml")[0]["namespace"]
    port = service["spec"]["ports"][0]["port"]
    expected = f"http://{service['metadata']['name']}.{namespace}.svc.cluster.local:{port}"
    allowed = _mlflow_server_args()["allowed-hosts"].split(",")
    for name, group in _groups(spec):
        env = _env(_ray_container(group))
        assert env.get("MLFLOW_TRACKING_URI", {}).get("value") == expected, (
            f"{source}: group {name!r} MLFLOW_TRACKING_URI should be {expected}"
        )
    # MLflow 3 rejects requests whose Host header is not allow-listed (DNS-rebinding guard);
    # the in-cluster name the Ray pods use must pass MLflow's own check.
    host = expected.removeprefix("http://")
    assert is_allowed_host_header(allowed, host), f"{host} not in --allowed-hosts {allowed}"
    assert not is_allowed_host_header(allowed, "attacker.example.com")


def test_rayjob_entrypoint_runs_an_existing_script_with_a_loadable_config() -> None:
    from service.config import load_config

    job = _doc("kuberay/rayjob.yaml", "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/pretrain.py"], argv
    assert (REPO / argv[1]).is_file(), f"entrypoint script {argv[1]} is not in the repository"
    config_path = argv[argv.index("--config") + 1]
    assert config_path == "jobs/configs/cifar10-resnet18-gpu.yaml"
    assert (REPO / config_path).is_file(), f"entrypoint config {config_path} is not in the repo"
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    config = load_config(REPO / config_path, overrides)  # unknown override keys raise here

    # Data and checkpoints must be where every Ray pod sees them: on a volume all pods mount
    # (Ray Train restores checkpoints on any node) or in an object store.
    spec = job["rayClusterSpec"]
    paths = {
        "train.storage_path": config.train.storage_path,
        **{f"data.{k}": getattr(config.data, k) for k in ("train", "val", "test")},
    }
    for name, group in _groups(spec):
        mounts = [m["mountPath"] for m in _ray_container(group).get("volumeMounts", [])]
        for key, value in paths.items():
            assert (
                value is None or "://" in value or any(value.startswith(m + "/") for m in mounts)
            ), f"{key}={value} is on no volume of group {name!r}"
    # The cluster must fit the run: one GPU (and cpus_per_worker CPUs) per Ray Train worker.
    for source, cluster, count in [
        ("rayjob.yaml", spec, "replicas"),
        ("raycluster.yaml", _ray_cluster_specs()[0][1], "maxReplicas"),
    ]:
        workers = [g for n, g in _groups(cluster) if n != "head"]
        if config.train.use_gpu:
            gpu_slots = sum(g[count] * _gpus(_ray_container(g)) for g in workers)
            assert gpu_slots >= config.train.num_workers, (
                f"{source}: train.num_workers={config.train.num_workers} GPU workers, "
                f"{count} allow {gpu_slots} GPUs"
            )
        biggest = max(_cpus(_ray_container(g)["resources"]["limits"]["cpu"]) for g in workers)
        assert config.train.cpus_per_worker <= biggest, f"{source}: no group fits a worker"


def test_ray_versions_agree_across_dockerfile_kuberay_and_launcher() -> None:
    match = OFFICIAL_RAY_IMAGE.match(_dockerfile_from())
    assert match, f"deploy/Dockerfile FROM {_dockerfile_from()} is not an official Ray image"
    version = match.group(1)
    for source, spec in _ray_cluster_specs():
        assert spec["rayVersion"] == version, f"{source}: rayVersion != Dockerfile's Ray {version}"
    launcher = _docs(DEPLOY / "cluster-launcher.yaml")[0]
    images = [v for k, v in launcher["docker"].items() if k.endswith("image")]
    images += [
        t["docker"]["worker_image"]
        for t in launcher["available_node_types"].values()
        if "docker" in t
    ]
    for image in images:
        m = OFFICIAL_RAY_IMAGE.match(image)
        assert m and m.group(1) == version, f"cluster-launcher image {image} != Ray {version}"


# ----------------------------------------------------------------------------- cluster launcher


def test_cluster_launcher_passes_rays_own_validation() -> None:
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _docs(DEPLOY / "cluster-launcher.yaml")[0]
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in config, f"cluster-launcher.yaml lacks {key}"
    assert config["head_node_type"] in config["available_node_types"]
    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # What `ray up` runs before launching anything: fills provider defaults, then validates.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_launcher_installs_the_project_and_keeps_ray_private() -> None:
    config = _docs(DEPLOY / "cluster-launcher.yaml")[0]
    assert config["file_mounts"].get("~/contrastive-service") == ".", "checkout is not synced"
    setup = " ".join(config["setup_commands"])
    assert "cd ~/contrastive-service" in setup and re.search(r"pip install .*\s\.$", setup)
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "the job API must bind localhost on the head"
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "MLFLOW_TRACKING_URI=" in head and "MLFLOW_TRACKING_URI=" in workers
    assert any(
        t["node_config"]["InstanceType"].startswith(("g", "p"))
        for t in config["available_node_types"].values()
    ), "no GPU node type"


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_from_official_ray_image_and_installs_the_project() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert OFFICIAL_RAY_IMAGE.match(_dockerfile_from()), _dockerfile_from()
    assert re.search(r"^COPY\s+(--\S+\s+)*\.\s+\S+", text, re.M), "the project is not copied"
    assert re.search(r"^RUN pip install .*\s\.(\s|$)", text, re.M), "the project is not installed"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in {"root", "0"}, "the image must not run as root"
    for name in re.findall(r"^(?:ARG|ENV)\s+(\w+)", text, re.M):
        assert not SECRET_NAME.search(name), f"Dockerfile bakes in {name}"


def test_dockerignore_keeps_the_project_and_drops_local_state() -> None:
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("pyproject.toml", "README.md", "service", "jobs"):
        assert not any(fnmatch.fnmatch(needed, p) for p in patterns), f"{needed} is ignored"
    for dropped in (".git", ".env", "mlruns", "outputs"):
        assert dropped in patterns, f"{dropped} would enter the build context"


# ----------------------------------------------------------------------------- secrets

SECRET_NAME = re.compile(r"passw(or)?d|secret|token|access[-_]?key|credential", re.I)
PLACEHOLDER = re.compile(r"^<[^>]+>$")
# Under a secret-looking key, a file path or an environment variable is a reference, not a secret.
REFERENCE = re.compile(r"^(<[^>]+>|[~/$].*)$")
SECRET_TEXT = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@]+:[^\s/@$<]+@"),  # scheme://user:password@
    re.compile(r"(passw(or)?d|secret|token)\w*[ \t]*[:=][ \t]*[\"']?[A-Za-z0-9+/_.-]{8,}", re.I),
]


def _yaml_secret_findings(node: Any) -> list[str]:
    """Paths of literal values under secret-looking keys, env vars or Secret data that are not
    ``<placeholders>``; references (valueFrom/secretKeyRef, files, $VARS) are fine."""
    found: set[str] = set()

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("kind") == "Secret":
                for field in ("data", "stringData"):
                    for key, value in (node.get(field) or {}).items():
                        if not PLACEHOLDER.match(str(value)):
                            found.add(f"{path}.{field}.{key}")
            if SECRET_NAME.search(str(node.get("name", ""))) and "value" in node:
                found.add(f"{path}.{node['name']}")
            for key, value in node.items():
                is_scalar = isinstance(value, str | int | float)
                if SECRET_NAME.search(str(key)) and is_scalar and not REFERENCE.match(str(value)):
                    found.add(f"{path}.{key}")
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")

    walk(node, "")
    return sorted(found)


def _text_secret_findings(text: str) -> list[str]:
    return [m.group(0) for pattern in SECRET_TEXT for m in pattern.finditer(text)]


def test_secret_detectors_catch_planted_secrets() -> None:
    planted = yaml.safe_load(
        "env: [{name: DB_PASSWORD, value: hunter2hunter2}]\n"
        "kind: Secret\nstringData: {password: hunter2hunter2}\n"
        "aws_secret_access_key: wJalrXUtnFEMI\n"
    )
    assert _yaml_secret_findings(planted) == [
        ".aws_secret_access_key",
        ".env[0].DB_PASSWORD",
        ".stringData.password",
    ]
    for text in (
        "postgresql://mlflow:s3cretpass@db:5432/mlflow",
        "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
        "password: hunter2hunter2",
    ):
        assert _text_secret_findings(text), text
    clean = yaml.safe_load(
        "env: [{name: PGPASSWORD, valueFrom: {secretKeyRef: {name: db, key: password}}}]\n"
        "kind: Secret\nstringData: {password: '<REPLACE: openssl rand -hex 24>'}\n"
    )
    assert _yaml_secret_findings(clean) == []
    assert _text_secret_findings('--from-literal=password="$(openssl rand -hex 24)"') == []


def test_no_literal_secrets_in_deploy() -> None:
    findings = []
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        rel = path.relative_to(REPO).as_posix()
        findings += [f"{rel}: {hit}" for hit in _text_secret_findings(path.read_text())]
        if path.suffix == ".yaml":
            for doc in _docs(path):
                findings += [f"{rel}: {hit}" for hit in _yaml_secret_findings(doc)]
    assert findings == [], "secret-looking literals:\n" + "\n".join(findings)


# ----------------------------------------------------------------------------- docs


def test_readme_references_existing_repository_paths() -> None:
    text = (DEPLOY / "README.md").read_text() + (DEPLOY / "mlflow/README.md").read_text()
    paths = set(
        re.findall(
            r"\b((?:deploy|jobs|service)(?:/[\w-][\w.-]*)*/[\w-]+\.(?:py|yaml|sh|md))\b", text
        )
    )
    assert {"jobs/pretrain.py", "jobs/configs/smoke-cpu.yaml"} <= paths
    missing = sorted(p for p in paths if not (REPO / p).is_file())
    assert missing == [], f"deploy docs reference missing files: {missing}"


def _shell_blocks(path: Path) -> list[list[str]]:
    """The lines of each fenced bash/sh block of a Markdown file, comments removed."""
    blocks = re.findall(r"^\s*```(?:bash|sh)\n(.*?)^\s*```", path.read_text(), re.M | re.S)
    return [[ln.split(" #", 1)[0] for ln in b.splitlines() if not ln.strip().startswith("#")]
            for b in blocks]  # fmt: skip


def _command_docs() -> list[Path]:
    return [
        REPO / "README.md",
        *sorted(DEPLOY.rglob("*.md")),
        *sorted((REPO / "docs").glob("*.md")),
    ]


def test_every_documented_ray_job_command_runs_in_token_mode() -> None:
    """Ray 2.60's `ray job` client sends the token only with RAY_AUTH_MODE=token: a token file
    alone (the mode unset) gets 401s. Every `ray job` line of the docs' shell blocks has the mode
    exported earlier in its block or set on the line."""
    missing = []
    for path in _command_docs():
        for block in _shell_blocks(path):
            exported = False
            for line in block:
                exported |= bool(re.search(r"\bexport\b.*\bRAY_AUTH_MODE=token\b", line))
                if re.search(r"\bray job\b", line) and not (
                    exported or "RAY_AUTH_MODE=token" in line
                ):
                    missing.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert missing == [], f"`ray job` without RAY_AUTH_MODE=token: {missing}"


def test_the_readme_says_a_token_file_alone_is_not_enough() -> None:
    text = (REPO / "README.md").read_text()
    bullet = text[text.index("**The auth token.**") :].split("\n- ", 1)[0]
    assert "turns token mode on" not in bullet  # true of `ray start`, not of `ray job`
    assert re.search(r"`ray job[^`]*`[^.]*RAY_AUTH_MODE=token", " ".join(bullet.split())), bullet


def test_cluster_examples_take_the_mlflow_port_from_a_variable() -> None:
    """A shared host may already serve port 5000: no command in the cluster examples hard-codes
    it (comments may name the default); the port is MLFLOW_PORT, set in one place."""
    readme = REPO / "README.md"
    section = readme.read_text().split("## On a Ray cluster", 1)[1].split("\n## ", 1)[0]
    lines = [ln for b in _shell_blocks(readme) for ln in b if ln.strip() and ln in section]
    lines += [ln for p in (DEPLOY / "README.md",) for b in _shell_blocks(p) for ln in b]
    assert lines and [ln for ln in lines if ":5000" in ln] == []
    config = _docs(DEPLOY / "cluster-launcher.yaml")[0]
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert [c for c in commands if "5000" in c] == []
    assert all("$MLFLOW_PORT" in c for c in commands if "MLFLOW_TRACKING_URI=" in c)
    assert [c for c in config["setup_commands"] if "MLFLOW_PORT=" in c], "set in one place"


# ----------------------------------------------------------------------------- MLflow server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return env | extra


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_mlflow_script_refuses_a_remote_bind_without_opt_in(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(START_SCRIPT), str(tmp_path / "store")],
        env=_script_env(MLFLOW_HOST="0.0.0.0"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "MLFLOW_ALLOW_REMOTE=1" in result.stderr and "no authentication" in result.stderr
    assert not (tmp_path / "store").exists(), "nothing may start before the opt-in check"


@pytest.mark.slow
def test_mlflow_server_script_serves_tracking_api_and_stops(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    store = tmp_path / "store"
    port = _free_port()
    env = _script_env(MLFLOW_PORT=str(port), MLFLOW_WORKERS="1", MLFLOW_START_TIMEOUT="90")
    started = subprocess.run(
        [str(START_SCRIPT), "--detach", str(store)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    pid_file = store / "mlflow.pid"
    pgid = int(pid_file.read_text()) if pid_file.exists() else None
    try:
        assert started.returncode == 0, started.stderr
        uri = started.stdout.strip().splitlines()[-1]
        assert uri == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{uri}/health", timeout=10) as response:
            assert response.read().decode().strip() == "OK"

        client = MlflowClient(tracking_uri=uri)
        experiment_id = client.create_experiment("deploy-smoke")
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "loss", 0.5, step=1)
        client.log_text(run.info.run_id, "hello", "notes/hello.txt")
        client.set_terminated(run.info.run_id)
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(1, 0.5)]
        # Artifacts are proxied by the server into <store>/artifacts; the DB is SQLite.
        assert [p.read_text() for p in (store / "artifacts").rglob("hello.txt")] == ["hello"]
        assert (store / "mlflow.db").is_file()

        # MLflow 3's security middleware: an unexpected Host header is refused.
        request = urllib.request.Request(
            f"{uri}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}",
            headers={"Host": "attacker.example.com"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403

        stopped = subprocess.run(
            [str(STOP_SCRIPT), str(store)], env=env, capture_output=True, text=True, timeout=30
        )
        assert stopped.returncode == 0, stopped.stderr
        assert pgid is not None and not _group_alive(pgid), "server processes survived stop"
        assert not pid_file.exists()
    finally:
        if pgid is not None and _group_alive(pgid):  # never leave a server behind
            os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.5)


# ----------------------------------------------------------------------------- air-gapped install
# The end-to-end check (download, offline install into a torch-only venv, smoke run) takes
# minutes: deploy/test_wheelhouse.sh, run by hand (docs/benchmarks.md). Here: the cheap parts.

WHEELHOUSE_SH = DEPLOY / "wheelhouse.sh"


def _wheelhouse_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("wheelhouse", DEPLOY / "wheelhouse.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_wheel(folder: Path, name: str, version: str, *requires: str, tag: str = "") -> Path:
    """A wheel with only METADATA: what the check reads."""
    import zipfile

    dist = name.replace("-", "_")
    path = folder / f"{dist}-{version}-{tag or 'py3-none-any'}.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}-{version}.dist-info/METADATA", metadata)
    return path


@pytest.fixture
def fake_wheelhouse(tmp_path: Path) -> Path:
    """The project's shape in small: torch wanted directly, an extra, a Python-version marker."""
    _fake_wheel(
        tmp_path, "contrastive-service", "0.1.0", "torch>=2.4", "torchvision>=0.19",
        "ray[data]>=2.50", 'tomli>=2; python_version < "3.12"', 'pytest>=8; extra == "dev"',
    )  # fmt: skip
    _fake_wheel(tmp_path, "ray", "2.60.0", 'pyarrow>=9; extra == "data"', "msgpack",
                tag="cp312-cp312-manylinux2014_x86_64")  # fmt: skip
    _fake_wheel(tmp_path, "pyarrow", "25.0.1", tag="cp312-cp312-manylinux_2_28_x86_64")
    _fake_wheel(tmp_path, "msgpack", "1.2.4", tag="cp312-cp312-manylinux_2_17_x86_64")
    return tmp_path


@pytest.mark.parametrize(
    "args",
    [[], ["3.12"], ["3", "out"], ["3.12", "out", "--with-torch"], ["3.12", "out", "x", "y"]],
    ids=["none", "no-dir", "bad-version", "bad-flag", "too-many"],
)
def test_wheelhouse_script_refuses_bad_arguments(args: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([str(WHEELHOUSE_SH), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 2 and "usage: " in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_wheelhouse_script_refuses_a_folder_with_wheels(tmp_path: Path) -> None:
    (tmp_path / "old-1.0-py3-none-any.whl").write_bytes(b"")
    proc = subprocess.run([str(WHEELHOUSE_SH), "3.12", str(tmp_path)], capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 2 and "not empty" in proc.stderr, proc.stderr


def test_wheelhouse_without_torch_ships_no_torch_and_keeps_every_other_requirement(
    fake_wheelhouse: Path,
) -> None:
    wheelhouse = _wheelhouse_module()
    assert wheelhouse.check(fake_wheelhouse, "3.12", without_torch=True) == []
    # torch is the target's own: without --without-torch it must be in the wheelhouse
    missing = wheelhouse.check(fake_wheelhouse, "3.12", without_torch=False)
    assert [p.split(" (")[0] for p in missing] == [
        "contrastive-service needs torch>=2.4",
        "contrastive-service needs torchvision>=0.19",
    ]
    # the CUDA stack never travels with --without-torch
    tag = "py3-none-manylinux_2_27_x86_64"
    for name, version in [("torch", "2.14.1"), ("triton", "3.6.0"), ("nvidia-nccl-cu12", "2.27")]:
        _fake_wheel(fake_wheelhouse, name, version, tag=tag)
    problems = wheelhouse.check(fake_wheelhouse, "3.12", without_torch=True)
    assert sorted(p.split("-")[0] for p in problems) == ["nvidia_nccl_cu12", "torch", "triton"]


def test_wheelhouse_check_follows_extras_and_target_markers(fake_wheelhouse: Path) -> None:
    wheelhouse = _wheelhouse_module()
    (fake_wheelhouse / "pyarrow-25.0.1-cp312-cp312-manylinux_2_28_x86_64.whl").unlink()
    assert wheelhouse.check(fake_wheelhouse, "3.12", without_torch=True) == [
        'ray needs pyarrow>=9; extra == "data" (no wheel of pyarrow)'
    ]
    # tomli is needed below 3.12 only: a 3.11 target misses it (and every cp312 wheel misfits)
    problems = wheelhouse.check(fake_wheelhouse, "3.11", without_torch=True)
    assert any(p.startswith("contrastive-service needs tomli>=2") for p in problems)
    assert sum("does not install on CPython 3.11" in p for p in problems) == 2


def test_wheelhouse_check_wants_one_version_each_and_a_version_in_range(
    fake_wheelhouse: Path,
) -> None:
    wheelhouse = _wheelhouse_module()
    _fake_wheel(fake_wheelhouse, "msgpack", "1.0.0", tag="cp312-cp312-manylinux_2_17_x86_64")
    _fake_wheel(fake_wheelhouse, "faiss-cpu", "1.15.1", tag="cp312-cp312-win_amd64")
    problems = wheelhouse.check(fake_wheelhouse, "3.12", without_torch=True)
    assert [p.split(":")[0] for p in problems] == [
        "faiss_cpu-1.15.1-cp312-cp312-win_amd64.whl does not install on CPython 3.12 manylinux"
        " x86_64",
        "two versions of msgpack",
    ]
    for wheel in fake_wheelhouse.glob("ray-*.whl"):
        wheel.unlink()
    _fake_wheel(fake_wheelhouse, "ray", "2.40.0", tag="cp312-cp312-manylinux2014_x86_64")
    problems = wheelhouse.check(fake_wheelhouse, "3.12", without_torch=True)
    assert problems[-1].startswith("contrastive-service needs ray[data]>=2.50, the wheelhouse has")


def test_wheelhouse_stub_wheel_is_a_wheel_pip_takes(tmp_path: Path) -> None:
    """The stand-in for the target's torch that wheelhouse.sh resolves against."""
    wheelhouse = _wheelhouse_module()
    stub = wheelhouse.stub_wheel("torch", "2.11.0", tmp_path)
    assert stub.name == "torch-2.11.0+stub-py3-none-any.whl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--ignore-installed",
         "--find-links", str(tmp_path), "torch==2.11.0+stub", "--report", "-", "--quiet"],
        env=env | {"PIP_CONFIG_FILE": os.devnull}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (installed,) = json.loads(proc.stdout)["install"]
    assert installed["metadata"]["version"] == "2.11.0+stub"
    assert installed["metadata"].get("requires_dist") is None  # nothing of torch's CUDA stack


def test_wheelhouse_helper_doctests() -> None:
    import doctest

    result = doctest.testmod(_wheelhouse_module())
    assert result.attempted >= 2 and result.failed == 0
