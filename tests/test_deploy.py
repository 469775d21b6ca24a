"""Static checks of the deployment files: docker-compose.yml, deploy/Dockerfile and deploy/k8s.

Nothing here needs Docker, a cluster or the network. The point is to catch, before anyone deploys, a
command naming a module that does not exist, a probe or Service pointing at the wrong port, or a
manifest that kustomization.yaml forgot. Each test collects every problem it finds and reports them
together.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S_DIR = ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"
SETTINGS_FILE = ROOT / "shared" / "settings.py"

INFRA_SERVICES = {"postgres", "redis"}


@functools.cache
def service_ports() -> dict[str, int]:
    """SERVICE_PORTS from shared/settings.py, read without importing the project (the services take
    their ports from it, so the deployment files must agree with it)."""
    tree = ast.parse(SETTINGS_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "SERVICE_PORTS" for t in node.targets
        ):
            ports = ast.literal_eval(node.value)
            assert isinstance(ports, dict) and ports, "SERVICE_PORTS is not a non-empty dict literal"
            return ports
    pytest.fail(f"SERVICE_PORTS not found in {SETTINGS_FILE.relative_to(ROOT)}")


def module_file(module: str) -> Path | None:
    """Where `python -m <module>` would find its code in this repository, or None."""
    if not module or not all(part.isidentifier() for part in module.split(".")):
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base / "__main__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def python_module_problem(command: Any, where: str) -> str | None:
    """None when `command` is `python -m <module> ...` with <module> present in the repository."""
    argv = shlex.split(command) if isinstance(command, str) else command
    if not isinstance(argv, list) or len(argv) < 3 or argv[0] != "python" or argv[1] != "-m":
        return f"{where}: command {command!r} is not `python -m <module> ...`"
    module = str(argv[2])
    if module_file(module) is None:
        path = module.replace(".", "/")
        return f"{where}: module {module!r} not found (no {path}/__main__.py or {path}.py)"
    return None


# --- docker-compose.yml ------------------------------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose file has no services"
    return data


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services


def compose_instances(name: str) -> dict[str, dict[str, Any]]:
    """The compose services running ``name``: the one of that name, or its shards ``<name>-0``, ``<name>-1``, ..."""
    services = compose_services()
    if name in services:
        return {name: services[name]}
    return {n: svc for n, svc in services.items() if re.fullmatch(rf"{re.escape(name)}-\d+", n)}


def coinlytics_containers() -> dict[str, dict[str, Any]]:
    """Services built from this repository (everything but the stock PostgreSQL and Redis images)."""
    return {name: svc for name, svc in compose_services().items() if "build" in svc}


def one_shot_services() -> set[str]:
    """Services others wait on to *finish*: a healthcheck on them would be meaningless."""
    one_shots = set()
    for svc in compose_services().values():
        depends = svc.get("depends_on") or {}
        if isinstance(depends, dict):
            for name, cond in depends.items():
                if isinstance(cond, dict) and cond.get("condition") == "service_completed_successfully":
                    one_shots.add(name)
    return one_shots


def healthcheck_test(svc: dict[str, Any]) -> str:
    test = (svc.get("healthcheck") or {}).get("test")
    return " ".join(test) if isinstance(test, list) else str(test or "")


def test_compose_has_infrastructure_and_every_service() -> None:
    names = set(compose_services())
    missing = (INFRA_SERVICES | {"migrate"}) - names | {n for n in service_ports() if not compose_instances(n)}
    assert not missing, f"docker-compose.yml lacks services: {sorted(missing)}"


def test_compose_long_running_services_have_healthchecks() -> None:
    problems = []
    for name, svc in compose_services().items():
        if name in one_shot_services():
            continue
        check = svc.get("healthcheck")
        if not isinstance(check, dict) or check.get("disable") or not check.get("test"):
            problems.append(f"{name}: no enabled healthcheck")
    assert "pg_isready" in healthcheck_test(compose_services()["postgres"]), "postgres: not checked by pg_isready"
    assert "ping" in healthcheck_test(compose_services()["redis"]), "redis: not checked by redis-cli ping"
    assert not problems, "\n".join(problems)


def test_compose_commands_name_existing_modules() -> None:
    containers = coinlytics_containers()
    assert containers, "no service in docker-compose.yml builds the Coinlytics image"
    problems = []
    for name, svc in containers.items():
        if "command" not in svc:
            problems.append(f"{name}: no command (the image default would run the gateway)")
            continue
        problem = python_module_problem(svc["command"], f"compose service {name}")
        if problem:
            problems.append(problem)
    for name in service_ports():
        for instance, svc in compose_instances(name).items():
            command = svc.get("command")
            if command != ["python", "-m", f"services.{name}"]:
                problems.append(f"{instance}: command is {command!r}, expected python -m services.{name}")
    migrate = containers.get("migrate", {}).get("command")
    if migrate != ["python", "-m", "coinlytics", "migrate"]:
        problems.append(f"migrate: command is {migrate!r}")
    assert not problems, "\n".join(problems)


def test_compose_service_healthchecks_probe_their_own_port() -> None:
    problems = []
    for service, port in service_ports().items():
        for name, svc in compose_instances(service).items():
            test = healthcheck_test(svc)
            if f"http://127.0.0.1:{port}/healthz" not in test:
                problems.append(f"{name}: healthcheck {test!r} does not request 127.0.0.1:{port}/healthz")
            if "curl" in test or "wget" in test:
                problems.append(f"{name}: healthcheck uses a tool the slim image does not have")
    assert not problems, "\n".join(problems)


def test_compose_services_wait_for_dependencies_and_migration() -> None:
    expected = {
        "postgres": "service_healthy",
        "redis": "service_healthy",
        "migrate": "service_completed_successfully",
    }
    problems = []
    for name in [n for service in service_ports() for n in compose_instances(service)]:
        depends = compose_services().get(name, {}).get("depends_on") or {}
        for dep, condition in expected.items():
            actual = (depends.get(dep) or {}).get("condition") if isinstance(depends, dict) else None
            if actual != condition:
                problems.append(f"{name}: depends_on {dep} is {actual!r}, expected {condition}")
    assert not problems, "\n".join(problems)


def test_compose_publishes_only_the_gateway() -> None:
    # The opt-in monitoring profile (Prometheus, Grafana) may publish, but on the host's loopback only.
    monitoring = {name for name, svc in compose_services().items() if "monitoring" in (svc.get("profiles") or [])}
    published = {
        name: svc["ports"] for name, svc in compose_services().items() if svc.get("ports") and name not in monitoring
    }
    gateway_port = service_ports()["gateway"]
    assert published == {"gateway": [f"{gateway_port}:{gateway_port}"]}
    public = [
        f"{name}: {port}"
        for name in monitoring
        for port in compose_services()[name].get("ports") or []
        if not str(port).startswith("127.0.0.1:")
    ]
    assert not public, f"monitoring services published beyond the loopback: {public}"


def test_compose_environment_points_services_at_each_other() -> None:
    problems = []
    for name, svc in coinlytics_containers().items():
        env = svc.get("environment") or {}
        if not isinstance(env, dict):
            problems.append(f"{name}: environment is not a mapping")
            continue
        for secret in ("COINLYTICS_JWT_SECRET", "COINLYTICS_HMAC_KEY"):
            # `${VAR:?...}` makes compose refuse to start instead of running with an empty secret.
            if not str(env.get(secret, "")).startswith(f"${{{secret}:?"):
                problems.append(f"{name}: {secret} is not required from the host environment")
        for target, port in service_ports().items():
            if target == "gateway":
                continue
            url = env.get(f"COINLYTICS_{target.upper()}_URL")
            if url != f"http://{target}:{port}":
                problems.append(f"{name}: COINLYTICS_{target.upper()}_URL is {url!r}")
        for key in ("COINLYTICS_DATABASE_URL", "COINLYTICS_REDIS_URL"):
            host = urlparse(str(env.get(key, ""))).hostname
            if host not in INFRA_SERVICES:
                problems.append(f"{name}: {key} host {host!r} is not a compose service")
        if env.get("COINLYTICS_HOST") != "0.0.0.0":
            problems.append(f"{name}: COINLYTICS_HOST must be 0.0.0.0 to be reachable from other containers")
    assert not problems, "\n".join(problems)


def volume_mounts(svc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a compose service's volumes, short ("src:dst[:ro]") or long syntax."""
    mounts = []
    for entry in svc.get("volumes") or []:
        if isinstance(entry, dict):
            mounts.append((str(entry.get("source", "")), str(entry.get("target", "")), bool(entry.get("read_only"))))
            continue
        source, _, rest = str(entry).partition(":")
        target, _, mode = rest.partition(":")
        mounts.append((source, target, "ro" in mode.split(",")))
    return mounts


def test_compose_services_share_one_data_volume() -> None:
    """One named volume at the data dir of every service: all of them append to one system log, which the
    gateway's report reads (docs/operations.md)."""
    named = set(compose().get("volumes") or {})
    problems = []
    found: set[tuple[str, str]] = set()
    for name, svc in [item for service in service_ports() for item in compose_instances(service).items()]:
        data_dir = str((svc.get("environment") or {}).get("COINLYTICS_DATA_DIR") or "")
        if not data_dir.startswith("/"):
            problems.append(f"{name}: COINLYTICS_DATA_DIR is {data_dir or None!r}, not an absolute path")
            continue
        at_data_dir = [(src, ro) for src, dst, ro in volume_mounts(svc) if dst.rstrip("/") == data_dir.rstrip("/")]
        if not at_data_dir:
            problems.append(f"{name}: nothing is mounted at its data dir {data_dir}")
            continue
        for source, read_only in at_data_dir:
            if source not in named:
                problems.append(f"{name}: {source!r} at {data_dir} is not a named volume of the compose file")
            if read_only:
                problems.append(f"{name}: {source} is mounted read-only at {data_dir}")
            found.add((source, data_dir.rstrip("/")))
    if len(found) > 1:
        problems.append(f"services do not share one data volume and dir: {sorted(found)}")
    # A new named volume copies the owner of the image's directory: it must exist there, owned by the
    # service user, or the services (not root) could not create the log in it.
    for _source, data_dir in found:
        runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN" and data_dir in args]
        if not any("install -d -o" in args or "chown" in args for args in runs):
            problems.append(f"deploy/Dockerfile does not create {data_dir} owned by the service user")
    assert not problems, "\n".join(problems)


# --- deploy/Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def test_dockerfile_cmd_names_an_existing_module() -> None:
    cmds = [args for keyword, args in dockerfile_instructions() if keyword == "CMD"]
    assert cmds, "deploy/Dockerfile has no CMD"
    cmd = cmds[-1]  # only the last CMD takes effect
    argv = json.loads(cmd) if cmd.startswith("[") else shlex.split(cmd)
    assert argv == ["python", "-m", "services.gateway"]
    problem = python_module_problem(argv, "Dockerfile CMD")
    assert problem is None, problem


def test_dockerfile_runs_as_non_root_and_copies_existing_paths() -> None:
    instructions = dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "deploy/Dockerfile never leaves root"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"final USER is {users[-1]!r}"
    problems = []
    for keyword, args in instructions:
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for source in sources:
            if not source.startswith("--") and not (ROOT / source).exists():
                problems.append(f"COPY source {source!r} does not exist in the repository")
    assert not problems, "\n".join(problems)


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    entries = {
        line.strip().removeprefix("**/").rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    required = {".venv", ".coinlytics", ".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
    assert required <= entries, f".dockerignore lacks {sorted(required - entries)}"


# --- deploy/k8s --------------------------------------------------------------------------------------


@functools.cache
def k8s_documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, object) for every manifest under deploy/k8s except kustomization.yaml."""
    files = sorted(K8S_DIR.glob("*.yaml")) + sorted(K8S_DIR.glob("*.yml"))
    assert files, f"no manifests in {K8S_DIR.relative_to(ROOT)}"
    docs = []
    for path in files:
        if path == KUSTOMIZATION:
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is None:
                continue
            assert isinstance(doc, dict) and doc.get("kind"), f"{path.name}: a document without a kind"
            docs.append((path.name, doc))
    return tuple(docs)


def objects(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(file, doc) for file, doc in k8s_documents() if doc["kind"] == kind]


def by_name(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in objects(kind)}


def workloads() -> list[tuple[str, dict[str, Any]]]:
    """The long-running services' controllers: Deployments, and StatefulSets for the sharded ones."""
    return objects("Deployment") + objects("StatefulSet")


def workload_by_name() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in workloads()}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container_ports(pod: dict[str, Any]) -> dict[str | int, int]:
    """containerPort by number and by name, so a Service's targetPort can be either."""
    ports: dict[str | int, int] = {}
    for container in pod["containers"]:
        for port in container.get("ports") or []:
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def test_k8s_has_a_deployment_and_service_per_coinlytics_service() -> None:
    for kind, names in (("Deployment or StatefulSet", workload_by_name()), ("Service", by_name("Service"))):
        missing = set(service_ports()) - set(names)
        assert not missing, f"no {kind} for {sorted(missing)}"
    assert objects("Job"), "no migration Job"


def test_k8s_commands_name_existing_modules() -> None:
    problems = []
    for file, doc in workloads() + objects("Job"):
        for container in pod_spec(doc)["containers"]:
            where = f"{file}: {doc['kind']} {doc['metadata']['name']} container {container['name']}"
            if "command" not in container:
                problems.append(f"{where}: no command (the image default would run the gateway)")
                continue
            problem = python_module_problem(container["command"], where)
            if problem:
                problems.append(problem)
    for name in service_ports():
        containers = pod_spec(workload_by_name()[name])["containers"]
        if [c.get("command") for c in containers] != [["python", "-m", f"services.{name}"]]:
            problems.append(f"workload {name} does not run python -m services.{name}")
    job_commands = [c.get("command") for _, job in objects("Job") for c in pod_spec(job)["containers"]]
    if ["python", "-m", "coinlytics", "migrate"] not in job_commands:
        problems.append("no Job runs python -m coinlytics migrate")
    assert not problems, "\n".join(problems)


def test_k8s_deployments_have_probes_on_declared_ports() -> None:
    problems = []
    for file, deployment in workloads():
        name = deployment["metadata"]["name"]
        pod = pod_spec(deployment)
        declared = container_ports(pod)
        for container in pod["containers"]:
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz?scope=traffic")):
                get = (container.get(probe) or {}).get("httpGet")
                if not get:
                    problems.append(f"{file}: {name}/{container['name']} has no HTTP {probe}")
                    continue
                if get.get("path") != path:
                    problems.append(f"{file}: {name} {probe} requests {get.get('path')!r}, expected {path}")
                if get.get("port") not in declared:
                    problems.append(f"{file}: {name} {probe} port {get.get('port')!r} is not a containerPort")
        expected = service_ports().get(name)
        if expected is not None and expected not in declared.values():
            problems.append(f"{file}: {name} listens on {expected} but declares {sorted(set(declared.values()))}")
    assert not problems, "\n".join(problems)


def test_k8s_deployments_are_non_root_and_bounded() -> None:
    problems = []
    for file, deployment in workloads() + objects("Job"):
        name = deployment["metadata"]["name"]
        pod = pod_spec(deployment)
        for container in pod["containers"]:
            run_as_non_root = (container.get("securityContext") or {}).get(
                "runAsNonRoot", (pod.get("securityContext") or {}).get("runAsNonRoot")
            )
            if run_as_non_root is not True:
                problems.append(f"{file}: {name}/{container['name']} may run as root")
            resources = container.get("resources") or {}
            for section in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(section) or {}):
                    problems.append(f"{file}: {name}/{container['name']} lacks cpu/memory {section}")
    assert not problems, "\n".join(problems)


def test_k8s_every_deployment_has_a_matching_service() -> None:
    services = objects("Service")
    problems = []
    for file, deployment in workloads():
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"].get("labels") or {}
        match = deployment["spec"]["selector"].get("matchLabels") or {}
        if not match or any(labels.get(k) != v for k, v in match.items()):
            problems.append(f"{file}: {name} selector {match} does not select its own pods {labels}")
        matching = [svc for _, svc in services if svc["spec"].get("selector") == labels]
        if not matching:
            problems.append(f"{file}: no Service selects exactly the {name} pod labels {labels}")
            continue
        declared = container_ports(pod_spec(deployment))
        for svc in matching:
            for port in svc["spec"].get("ports") or []:
                target = port.get("targetPort", port.get("port"))
                if target not in declared:
                    problems.append(
                        f"Service {svc['metadata']['name']}: targetPort {target!r} is not a containerPort of {name}"
                    )
    assert not problems, "\n".join(problems)


def test_k8s_configmap_urls_match_services() -> None:
    """Each service binds to the port in its URL, so URL, Service port and containerPort must agree."""
    services = by_name("Service")
    deployments = workload_by_name()
    problems = []
    urls = {
        key: value
        for _, configmap in objects("ConfigMap")
        for key, value in (configmap.get("data") or {}).items()
        if key.startswith("COINLYTICS_") and key.endswith("_URL")
    }
    for name in service_ports():
        if name == "gateway":
            continue
        key = f"COINLYTICS_{name.upper()}_URL"
        if key not in urls:
            problems.append(f"no ConfigMap sets {key}")
            continue
        url = urlparse(urls[key])
        host = (url.hostname or "").split(".")[0]
        svc, deployment = services.get(host), deployments.get(name)
        if host != name or svc is None or deployment is None:
            problems.append(f"{key}={urls[key]} does not name the {name} Service")
            continue
        service_ports_declared = [p["port"] for p in svc["spec"]["ports"]]
        if url.port not in service_ports_declared:
            problems.append(f"{key}: port {url.port} is not a port of Service {name} {service_ports_declared}")
        if url.port not in container_ports(pod_spec(deployment)).values():
            problems.append(f"{key}: {name} would listen on {url.port}, which its pod does not declare")
    assert not problems, "\n".join(problems)


def test_k8s_env_sources_exist() -> None:
    configmaps, secrets = set(by_name("ConfigMap")), set(by_name("Secret"))
    problems = []
    for file, workload in workloads() + objects("Job"):
        for container in pod_spec(workload)["containers"]:
            refs = container.get("envFrom") or []
            kinds = set()
            for ref in refs:
                if "configMapRef" in ref:
                    kinds.add("configMap")
                    if ref["configMapRef"]["name"] not in configmaps:
                        problems.append(f"{file}: ConfigMap {ref['configMapRef']['name']} is not defined")
                if "secretRef" in ref:
                    kinds.add("secret")
                    if ref["secretRef"]["name"] not in secrets:
                        problems.append(f"{file}: Secret {ref['secretRef']['name']} is not defined")
            if kinds != {"configMap", "secret"}:
                problems.append(f"{file}: {container['name']} does not take env from both ConfigMap and Secret")
    assert not problems, "\n".join(problems)


def test_k8s_workloads_mount_a_writable_data_dir() -> None:
    """The root filesystem is read-only, so the system log needs a volume at the data dir of every pod."""
    config = {k: v for _, cm in objects("ConfigMap") for k, v in (cm.get("data") or {}).items()}
    problems = []
    workloads = objects("Deployment") + objects("StatefulSet")
    assert workloads, "no Deployment"
    for file, workload in workloads:
        pod = pod_spec(workload)
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates") or []}
        writable = claims | {
            v["name"] for v in pod.get("volumes") or [] if "emptyDir" in v or "persistentVolumeClaim" in v
        }
        for container in pod["containers"]:
            where = f"{file}: {workload['metadata']['name']}/{container['name']}"
            env = {e["name"]: e.get("value") for e in container.get("env") or []}
            data_dir = str(env.get("COINLYTICS_DATA_DIR") or config.get("COINLYTICS_DATA_DIR") or "")
            if not data_dir.startswith("/"):
                problems.append(f"{where}: COINLYTICS_DATA_DIR is {data_dir or None!r}, not an absolute path")
                continue
            mounts = [m for m in container.get("volumeMounts") or [] if m["mountPath"].rstrip("/") == data_dir]
            if not any(m["name"] in writable and not m.get("readOnly") for m in mounts):
                problems.append(f"{where}: no writable volume (emptyDir or claim) mounted at {data_dir}")
    assert not problems, "\n".join(problems)


def test_k8s_hpas_target_existing_deployments() -> None:
    deployments = by_name("Deployment")
    hpas = objects("HorizontalPodAutoscaler")
    assert hpas, "no HorizontalPodAutoscaler"
    problems = []
    for file, hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        name = hpa["metadata"]["name"]
        if hpa["apiVersion"] != "autoscaling/v2":
            problems.append(f"{file}: HPA {name} uses {hpa['apiVersion']}")
        if ref.get("kind") != "Deployment" or ref.get("name") not in deployments:
            problems.append(f"{file}: HPA {name} targets missing {ref.get('kind')} {ref.get('name')!r}")
            continue
        # Utilization is measured against requests; without a CPU request the HPA cannot act.
        for container in pod_spec(deployments[ref["name"]])["containers"]:
            if "cpu" not in ((container.get("resources") or {}).get("requests") or {}):
                problems.append(f"{file}: HPA {name} scales {ref['name']}, which requests no CPU")
    assert not problems, "\n".join(problems)


def test_k8s_ingress_routes_only_to_existing_gateway_service() -> None:
    ingresses = objects("Ingress")
    assert ingresses, "no Ingress"
    services = by_name("Service")
    problems = []
    for file, ingress in ingresses:
        if not ingress["spec"].get("tls"):
            problems.append(f"{file}: Ingress {ingress['metadata']['name']} has no TLS")
        for rule in ingress["spec"].get("rules") or []:
            for path in (rule.get("http") or {}).get("paths") or []:
                backend = path["backend"]["service"]
                svc = services.get(backend["name"])
                if backend["name"] != "gateway" or svc is None:
                    problems.append(f"{file}: routes to {backend['name']!r}; only the gateway is public")
                    continue
                port = backend["port"]
                names = {(p.get("name"), p["port"]) for p in svc["spec"]["ports"]}
                if not any(port.get("name") == n or port.get("number") == p for n, p in names):
                    problems.append(f"{file}: gateway Service has no port {port}")
    assert not problems, "\n".join(problems)


def test_k8s_objects_share_the_namespace() -> None:
    namespaces = by_name("Namespace")
    assert list(namespaces) == ["coinlytics"], f"expected one Namespace coinlytics, got {list(namespaces)}"
    problems = [
        f"{file}: {doc['kind']} {doc['metadata'].get('name')} is in {doc['metadata'].get('namespace')!r}"
        for file, doc in k8s_documents()
        if doc["kind"] != "Namespace" and doc["metadata"].get("namespace") != "coinlytics"
    ]
    assert not problems, "\n".join(problems)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))
    listed = kustomization.get("resources") or []
    on_disk = {path.name for path in K8S_DIR.iterdir() if path.suffix in {".yaml", ".yml"} and path != KUSTOMIZATION}
    assert len(listed) == len(set(listed)), f"duplicates in kustomization.yaml: {listed}"
    assert not on_disk - set(listed), f"not listed in kustomization.yaml: {sorted(on_disk - set(listed))}"
    assert not set(listed) - on_disk, f"listed but missing: {sorted(set(listed) - on_disk)}"


# --- sharded services (docs/scaling.md) ---------------------------------------------------------------


def test_compose_runs_pricing_as_shards_that_answer_to_one_name() -> None:
    shards = compose_instances("pricing")
    assert len(shards) >= 2, f"docker-compose.yml runs {sorted(shards)}, not two or more pricing shards"
    assert sorted(shards) == [f"pricing-{i}" for i in range(len(shards))], sorted(shards)
    problems = []
    for name, svc in coinlytics_containers().items():
        # Ingest routes ticks by the same count the shards read theirs by.
        count = (svc.get("environment") or {}).get("COINLYTICS_PRICING_SHARDS")
        if str(count) != str(len(shards)):
            problems.append(f"{name}: COINLYTICS_PRICING_SHARDS is {count!r}; compose runs {len(shards)} shards")
    for name, svc in shards.items():
        shard = (svc.get("environment") or {}).get("COINLYTICS_SHARD")
        if str(shard) != name.rsplit("-", 1)[1]:
            problems.append(f"{name}: COINLYTICS_SHARD is {shard!r}")
        aliases = (((svc.get("networks") or {}).get("default") or {}).get("aliases")) or []
        if "pricing" not in aliases:
            problems.append(f"{name}: not reachable as pricing, the host of COINLYTICS_PRICING_URL")
    assert not problems, "\n".join(problems)


def test_k8s_runs_pricing_as_a_statefulset_with_one_shard_per_pod() -> None:
    config = {k: v for _, cm in objects("ConfigMap") for k, v in (cm.get("data") or {}).items()}
    statefulsets = by_name("StatefulSet")
    assert "pricing" in statefulsets, "pricing is not a StatefulSet"
    assert "pricing" not in by_name("Deployment"), "pricing is both a Deployment and a StatefulSet"
    pricing = statefulsets["pricing"]
    spec = pricing["spec"]
    problems = []
    count = config.get("COINLYTICS_PRICING_SHARDS")
    # Pod i of the StatefulSet is shard i: as many pods as shards, or some coins would have no owner.
    if str(spec.get("replicas")) != str(count):
        problems.append(f"replicas {spec.get('replicas')!r} != COINLYTICS_PRICING_SHARDS {count!r} (ConfigMap)")
    headless = by_name("Service").get(spec.get("serviceName"))
    if headless is None or headless["spec"].get("clusterIP") != "None":
        problems.append(f"serviceName {spec.get('serviceName')!r} is not a headless Service")
    elif headless["spec"].get("selector") != spec["template"]["metadata"].get("labels"):
        problems.append(f"headless Service {spec.get('serviceName')} does not select the pricing pods")
    for container in pod_spec(pricing)["containers"]:
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        if env.get("COINLYTICS_SHARD") != "auto":
            problems.append(f"{container['name']}: COINLYTICS_SHARD is {env.get('COINLYTICS_SHARD')!r}, not auto")
        if "COINLYTICS_PRICING_SHARDS" in env:
            problems.append(f"{container['name']}: sets its own shard count; ingest reads the ConfigMap's")
    for _, hpa in objects("HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"].get("name") == "pricing":
            problems.append(f"HPA {hpa['metadata']['name']} scales pricing, whose replicas are its shard count")
    assert not problems, "\n".join(problems)


def test_k8s_runs_alerting_as_a_statefulset_with_one_shard_per_pod() -> None:
    config = {k: v for _, cm in objects("ConfigMap") for k, v in (cm.get("data") or {}).items()}
    statefulsets = by_name("StatefulSet")
    assert "alerting" in statefulsets, "alerting is not a StatefulSet"
    assert "alerting" not in by_name("Deployment"), "alerting is both a Deployment and a StatefulSet"
    alerting = statefulsets["alerting"]
    spec = alerting["spec"]
    problems = []
    if "COINLYTICS_ALERTING_SHARDS" in config:
        problems.append("the ConfigMap sets COINLYTICS_ALERTING_SHARDS: alerting.yaml sets it beside replicas")
    headless = by_name("Service").get(spec.get("serviceName"))
    if headless is None or headless["spec"].get("clusterIP") != "None":
        problems.append(f"serviceName {spec.get('serviceName')!r} is not a headless Service")
    elif headless["spec"].get("selector") != spec["template"]["metadata"].get("labels"):
        problems.append(f"headless Service {spec.get('serviceName')} does not select the alerting pods")
    for container in pod_spec(alerting)["containers"]:
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        if env.get("COINLYTICS_SHARD") != "auto":
            problems.append(f"{container['name']}: COINLYTICS_SHARD is {env.get('COINLYTICS_SHARD')!r}, not auto")
        # Pod i is shard i: as many pods as shards, or some coins' rules would have no evaluator.
        count = env.get("COINLYTICS_ALERTING_SHARDS")
        if str(spec.get("replicas")) != str(count):
            problems.append(f"replicas {spec.get('replicas')!r} != COINLYTICS_ALERTING_SHARDS {count!r}")
    for _, hpa in objects("HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"].get("name") == "alerting":
            problems.append(f"HPA {hpa['metadata']['name']} scales alerting, whose replicas are its shard count")
    assert not problems, "\n".join(problems)
