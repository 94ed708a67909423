#!/usr/bin/env python3
"""The checks behind deploy/check.sh that need a parser rather than a tool.

Each subcommand checks one thing and exits 0 (ok; anything printed is a note), 3 (skipped; the
output says why) or 1 (failed; one reason per line). check.sh turns that into its one-line
report. Run from the repository root. Needs Python 3.11 (tomllib) and PyYAML.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

try:
    import yaml
except ImportError:  # reported by the checks that need it
    yaml = None

OK, FAILED, SKIPPED = 0, 1, 3


class Failures:
    """Collects reasons; a check fails when there is at least one."""

    def __init__(self):
        self.reasons = []

    def add(self, reason):
        self.reasons.append(reason)

    def check(self, condition, reason):
        if not condition:
            self.add(reason)

    def finish(self, note=""):
        if self.reasons:
            print("\n".join(self.reasons))
            return FAILED
        if note:
            print(note)
        return OK


def need_yaml():
    if yaml is None:
        print("PyYAML is not installed (python3 -m pip install pyyaml, or apt-get install python3-yaml)")
        sys.exit(FAILED)


def load_yaml_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# --- YAML ------------------------------------------------------------------------------------

def cmd_yaml(_args):
    """Every YAML file under deploy/ parses; every Kubernetes object names its apiVersion, kind
    and metadata.name."""
    need_yaml()
    failures = Failures()
    files = sorted(p for p in Path("deploy").rglob("*") if p.suffix in (".yaml", ".yml"))
    for path in files:
        try:
            docs = load_yaml_docs(path)
        except yaml.YAMLError as error:
            failures.add(f"{path}: {' '.join(str(error).split())}")
            continue
        if path.parent == Path("deploy/k8s") and path.name != "kustomization.yaml":
            for i, doc in enumerate(docs):
                where = f"{path} document {i + 1}"
                if not isinstance(doc, dict):
                    failures.add(f"{where}: not a mapping")
                    continue
                for key in ("apiVersion", "kind"):
                    failures.check(isinstance(doc.get(key), str) and doc[key], f"{where}: no {key}")
                name = (doc.get("metadata") or {}).get("name")
                failures.check(isinstance(name, str) and name, f"{where}: no metadata.name")
    return failures.finish(f"{len(files)} files")


# --- Kubernetes ------------------------------------------------------------------------------

def objects_by_kind(docs):
    found = {}
    for doc in docs:
        found.setdefault(doc["kind"], []).append(doc)
    return found


def selector_matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def cmd_k8s(args):
    """Cross-references in the rendered manifests that a schema cannot see: selectors, named
    ports, the ConfigMap, weir.toml against the pod spec, the security settings."""
    need_yaml()
    docs = load_yaml_docs(args[0])
    failures = Failures()
    kinds = objects_by_kind(docs)
    for kind, count in [("Deployment", 1), ("Service", 4), ("PodDisruptionBudget", 1),
                        ("HorizontalPodAutoscaler", 1), ("ConfigMap", 1), ("ServiceAccount", 1)]:
        failures.check(len(kinds.get(kind, [])) == count,
                       f"expected {count} {kind}, rendered {len(kinds.get(kind, []))}")
    if failures.reasons:
        return failures.finish()
    deployment = kinds["Deployment"][0]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container.get("ports", [])}

    failures.check(selector_matches(deployment["spec"]["selector"]["matchLabels"], pod_labels),
                   "Deployment selector does not match its pod labels")
    failures.check("replicas" not in deployment["spec"],
                   "Deployment sets replicas, which the HPA owns")
    for service in kinds["Service"]:
        name = service["metadata"]["name"]
        failures.check(selector_matches(service["spec"].get("selector"), pod_labels),
                       f"Service {name}: selector does not match the weir pods")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            ok = target in port_names if isinstance(target, str) else target in port_names.values()
            failures.check(ok, f"Service {name}: targetPort {target} is not a container port")
    pdb = kinds["PodDisruptionBudget"][0]
    failures.check(selector_matches(pdb["spec"]["selector"].get("matchLabels"), pod_labels),
                   "PodDisruptionBudget selector does not match the weir pods")
    target = kinds["HorizontalPodAutoscaler"][0]["spec"]["scaleTargetRef"]
    failures.check(target["kind"] == "Deployment" and target["name"] == deployment["metadata"]["name"],
                   "HorizontalPodAutoscaler does not target the weir Deployment")
    failures.check(spec.get("serviceAccountName") in {s["metadata"]["name"] for s in kinds["ServiceAccount"]},
                   "the pod's serviceAccountName is not rendered")

    # Probes: readiness on /readyz, liveness on /healthz, both on the ops port.
    for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]:
        get = (container.get(probe) or {}).get("httpGet") or {}
        failures.check(get.get("path") == path, f"{probe} is not GET {path}")
        failures.check(get.get("port") == "ops" and "ops" in port_names,
                       f"{probe} does not use the ops port")

    # Security: non-root, read-only root, no privilege escalation, limits.
    security = container.get("securityContext") or {}
    failures.check((spec.get("securityContext") or {}).get("runAsNonRoot") is True, "runAsNonRoot is not true")
    failures.check(security.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem is not true")
    failures.check(security.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation is not false")
    failures.check("ALL" in ((security.get("capabilities") or {}).get("drop") or []), "capabilities are not dropped")
    resources = container.get("resources") or {}
    for part in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            failures.check(resource in (resources.get(part) or {}), f"no {part}.{resource}")
    image = container["image"]
    failures.check(":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"),
                   f"image {image} has no pinned tag")

    # The config: mounted where --config points, and weir.toml agrees with the pod.
    config_arg = container.get("args", [])
    config_path = config_arg[config_arg.index("--config") + 1] if "--config" in config_arg else None
    failures.check(config_path is not None, "the container does not pass --config")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    config_maps = {c["metadata"]["name"]: c for c in kinds["ConfigMap"]}
    weir_toml = None
    if config_path:
        directory, file_name = os.path.split(config_path)
        mount = mounts.get(directory)
        failures.check(mount is not None, f"nothing is mounted at {directory}")
        volume = volumes.get(mount["name"]) if mount else None
        sources = (volume or {}).get("projected", {}).get("sources", []) if volume else []
        if volume and "configMap" in volume:
            sources = [{"configMap": volume["configMap"]}]
        for source in sources:
            config_map = source.get("configMap")
            if not config_map:
                continue
            failures.check(config_map["name"] in config_maps,
                           f"volume {mount['name']}: ConfigMap {config_map['name']} is not rendered")
            for item in config_map.get("items", []):
                if item["path"] == file_name and config_map["name"] in config_maps:
                    weir_toml = config_maps[config_map["name"]]["data"].get(item["key"])
        failures.check(weir_toml is not None, f"{config_path} does not come from a rendered ConfigMap")
    if weir_toml is not None:
        config = tomllib.loads(weir_toml)
        data_dir = config.get("data_dir", "./weir-data")
        failures.check(data_dir in mounts and not mounts[data_dir].get("readOnly"),
                       f"data_dir {data_dir} is not a writable volume (the root filesystem is read-only)")
        failures.check(config.get("sink", {}).get("kind") == "kafka",
                       "the sink is not Kafka (replicas share nothing; SQLite in an emptyDir loses acked records)")
        listen_ports = {int(l["listen"].rsplit(":", 1)[1]) for l in config.get("listeners", []) if "listen" in l}
        listen_ports.add(int(config.get("ops", {}).get("listen", "127.0.0.1:9100").rsplit(":", 1)[1]))
        failures.check(listen_ports == set(port_names.values()),
                       f"weir.toml listens on {sorted(listen_ports)}, the container declares {sorted(port_names.values())}")
        for listener in config.get("listeners", []):
            host = listener.get("listen", "").rsplit(":", 1)[0]
            failures.check(host not in ("127.0.0.1", "[::1]"),
                           f"listener {listener.get('listen')} is loopback-only: unreachable from the Services")
    return failures.finish()


# --- Shutdown grace, across the artifacts ------------------------------------------------------

def grace_s(config_text):
    return tomllib.loads(config_text).get("shutdown", {}).get("grace_ms", 10_000) / 1000


def duration_s(text):
    """Docker/systemd durations as used here: 15, 15s, 1m, 1m30s, 500ms."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    total, matched = 0.0, ""
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|s|m|h|min)", text):
        total += float(number) * {"ms": 0.001, "us": 1e-6, "s": 1, "m": 60, "min": 60, "h": 3600}[unit]
        matched += number + unit
    if matched != text.replace(" ", ""):
        raise ValueError(f"cannot read the duration {text!r}")
    return total


def cmd_grace(args):
    """Every supervisor waits longer than weir's shutdown grace period before its SIGKILL, with
    at least 2 s to close the sink and exit: Kubernetes (preStop + grace), compose, systemd."""
    need_yaml()
    failures = Failures()
    margin = 2
    notes = []

    docs = load_yaml_docs(args[0])
    kinds = objects_by_kind(docs)
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    weir_toml = next(iter(kinds["ConfigMap"]))["data"]["weir.toml"]
    command = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command", [])
    sleep = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
    if command[:1] == ["sleep"]:
        sleep = float(command[1])
    termination = pod.get("terminationGracePeriodSeconds", 30)
    need = sleep + grace_s(weir_toml) + margin
    failures.check(termination >= need,
                   f"k8s: terminationGracePeriodSeconds {termination} < preStop {sleep} s + grace "
                   f"{grace_s(weir_toml)} s + {margin} s")
    notes.append(f"k8s {termination} s >= {sleep:g}+{grace_s(weir_toml):g}")

    compose_dir = Path("deploy/compose")
    compose = load_yaml_docs(compose_dir / "compose.yaml")[0]
    for name, service in compose["services"].items():
        configs = [v.split(":")[0] for v in service.get("volumes", [])
                   if isinstance(v, str) and v.split(":")[1:2] == ["/etc/weir/weir.toml"]]
        if not configs:
            continue
        grace = grace_s((compose_dir / configs[0]).read_text())
        stop = duration_s(service.get("stop_grace_period", "10s"))
        failures.check(stop >= grace + margin,
                       f"compose: {name} stop_grace_period {stop:g} s < grace {grace:g} s + {margin} s")
    notes.append("compose ok")

    unit = Path("deploy/systemd/weir.service").read_text()
    timeout = re.search(r"^TimeoutStopSec=(.+)$", unit, re.M)
    grace = grace_s(Path("gateway/weir.default.toml").read_text())
    if timeout is None:
        failures.add("systemd: no TimeoutStopSec")
    else:
        stop = duration_s(timeout.group(1))
        failures.check(stop >= grace + margin,
                       f"systemd: TimeoutStopSec {stop:g} s < default grace {grace:g} s + {margin} s")
        notes.append(f"systemd {stop:g} s >= {grace:g}")
    return failures.finish(", ".join(notes))


# --- compose -----------------------------------------------------------------------------------

def haproxy_backends(text):
    """Backend server ports per server host, and the health-check port."""
    servers = re.findall(r"^\s*server\s+(\S+)\s+([\w.-]+):(\d+)", text, re.M)
    check_port = re.search(r"^\s*default-server\s.*\bcheck\s+port\s+(\d+)", text, re.M)
    binds = {int(p) for p in re.findall(r"^\s*bind\s+\S*:(\d+)", text, re.M)}
    return servers, int(check_port.group(1)) if check_port else None, binds


def cmd_compose(_args):
    """What `docker compose config` cannot know: the files it mounts exist, images are pinned,
    haproxy sends each port to a weir listener and checks weir's ops port, data_dir is a volume."""
    need_yaml()
    failures = Failures()
    directory = Path("deploy/compose")
    compose = load_yaml_docs(directory / "compose.yaml")[0]
    services = compose["services"]
    weir_configs = {}
    for name, service in services.items():
        image = service.get("image", "")
        failures.check(image and ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"),
                       f"{name}: image {image!r} is not pinned to a tag")
        build = service.get("build")
        if build:
            context = directory / build["context"]
            failures.check((context / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']} in {context}")
        for volume in service.get("volumes", []):
            if not isinstance(volume, str):
                continue
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                failures.check((directory / source).exists(), f"{name}: mounts {source}, which does not exist")
                if target == "/etc/weir/weir.toml":
                    weir_configs[name] = tomllib.loads((directory / source).read_text())
        for dependency in service.get("depends_on", []):
            failures.check(dependency in services, f"{name}: depends on unknown service {dependency}")
    for name, config in weir_configs.items():
        targets = {v.split(":")[1] for v in services[name].get("volumes", []) if isinstance(v, str)}
        failures.check(config.get("data_dir") in targets, f"{name}: data_dir {config.get('data_dir')} is not a volume")

    haproxy = services.get("haproxy")
    if haproxy is None:
        failures.add("no haproxy service")
        return failures.finish()
    cfg = [v.split(":")[0] for v in haproxy.get("volumes", []) if v.split(":")[1].endswith("haproxy.cfg")]
    servers, check_port, binds = haproxy_backends((directory / cfg[0]).read_text())
    balanced = {host for _, host, _ in servers}
    for host in balanced:
        failures.check(host in weir_configs, f"haproxy balances to {host}, which is not a weir service")
        if host not in weir_configs:
            continue
        config = weir_configs[host]
        listen = {int(l["listen"].rsplit(":", 1)[1]) for l in config.get("listeners", []) if "listen" in l}
        sent = {int(port) for _, h, port in servers if h == host}
        failures.check(sent == listen, f"haproxy sends {host} ports {sorted(sent)}, it listens on {sorted(listen)}")
        ops = int(config.get("ops", {}).get("listen", "127.0.0.1:9100").rsplit(":", 1)[1])
        failures.check(check_port == ops, f"haproxy checks port {check_port}, {host}'s ops port is {ops}")
        failures.check(not config.get("ops", {}).get("listen", "127.0.0.1").startswith("127."),
                       f"{host}: ops listens on loopback; haproxy's checks cannot reach it")
    published = {int(str(p).rsplit(":", 2)[-1]) for p in haproxy.get("ports", [])}
    failures.check(binds <= published, f"haproxy binds {sorted(binds - published)} that compose does not publish")
    return failures.finish(f"{len(services)} services, haproxy over {sorted(balanced)}")


# --- Dockerfile ----------------------------------------------------------------------------------

def cmd_dockerfile(_args):
    """Base images pinned, the files it copies exist in the context, .dockerignore keeps target
    dirs and .git out, the entrypoint is the real CLI."""
    failures = Failures()
    text = Path("deploy/docker/Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", logical, re.M))
    stages = set()
    for image, _, stage in re.findall(r"^FROM\s+(\S+)(\s+AS\s+(\S+))?", logical, re.M | re.I):
        resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        if resolved not in stages:
            tag = resolved.rsplit("/", 1)[-1]
            failures.check(":" in tag and not tag.endswith(":latest") and "$" not in resolved,
                           f"FROM {image} -> {resolved}: not pinned to a tag")
        if stage:
            stages.add(stage)
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", logical, re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        for source in parts[:-1]:
            failures.check(source == "." or Path(source).exists(), f"COPY {source}: not in the build context")
    ignore = Path(".dockerignore")
    if not ignore.is_file():
        failures.add(".dockerignore is missing at the repository root")
    else:
        patterns = {l.strip().rstrip("/") for l in ignore.read_text().splitlines() if l.strip() and not l.startswith("#")}
        for needed in ("target", ".git"):
            failures.check(needed in patterns, f".dockerignore does not exclude {needed}")
    failures.check(re.search(r'^ENTRYPOINT \["weir"\]', text, re.M) is not None, 'ENTRYPOINT is not ["weir"]')
    cmd = re.search(r"^CMD (\[.*\])", text, re.M)
    failures.check(cmd is not None and json.loads(cmd.group(1))[:2] == ["run", "--config"],
                   'CMD does not start with "run", "--config"')
    failures.check(re.search(r"^USER\s+(?!0\b|root\b)\S+", text, re.M) is not None, "no non-root USER")
    return failures.finish()


# --- Grafana -------------------------------------------------------------------------------------

def registered_metrics(source):
    """Exposed sample names -> label names, from metrics.rs: the registry prefix, each
    register() call and its field's type. Counters get _total, histograms _bucket/_sum/_count."""
    prefix = re.search(r'Registry::with_prefix\("([^"]+)"\)', source)
    if not prefix:
        raise ValueError("no Registry::with_prefix in metrics.rs")
    if re.search(r"\.register_with_unit\(|\.sub_registry", source):
        raise ValueError("metrics.rs uses register_with_unit or sub registries; teach deploy/check.py their names")
    labels = {name: re.findall(r"pub (\w+):", body)
              for name, body in re.findall(r"pub struct (\w+Label) \{(.*?)\}", source, re.S)}
    fields = {name: (label, kind) for name, label, kind in
              re.findall(r"pub (\w+): (?:Family<(\w+), )?(Counter|Gauge|Histogram)\b", source)}
    metrics = {}
    for name, field in re.findall(r'\.register\(\s*"(\w+)",\s*"(?:[^"\\]|\\.)*",\s*m\.(\w+)\.clone\(\)', source, re.S):
        if field not in fields:
            raise ValueError(f"metrics.rs registers m.{field}, whose type was not found")
        label, kind = fields[field]
        base = f"{prefix.group(1)}_{name}"
        own = set(labels.get(label, [])) if label else set()
        if kind == "Counter":
            metrics[base + "_total"] = own
        elif kind == "Gauge":
            metrics[base] = own
        else:
            metrics[base + "_bucket"] = own | {"le"}
            metrics[base + "_sum"] = own
            metrics[base + "_count"] = own
    if len(metrics) < 10:
        raise ValueError(f"only {len(metrics)} metrics found in metrics.rs; the parser is out of date")
    return metrics


def walk(node, found):
    """Yields (key, value) for every key in nested dicts and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((key, value))
            walk(value, found)
    elif isinstance(node, list):
        for value in node:
            walk(value, found)
    return found


def cmd_grafana(_args):
    """The dashboard parses, selects its data source through a variable (no hard-coded uid), and
    every metric and label its queries use is one weir registers."""
    failures = Failures()
    path = Path("deploy/grafana/weir-dashboard.json")
    try:
        dashboard = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        print(f"{path}: {error}")
        return FAILED
    try:
        metrics = registered_metrics(Path("gateway/src/metrics.rs").read_text())
    except ValueError as error:
        print(error)
        return FAILED
    variables = dashboard.get("templating", {}).get("list", [])
    datasource_vars = [v["name"] for v in variables if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    failures.check(bool(datasource_vars), "no Prometheus data source variable")
    allowed_uids = {f"${{{n}}}" for n in datasource_vars} | {f"${n}" for n in datasource_vars} | {"-- Grafana --"}
    pairs = walk(dashboard, [])
    for key, value in pairs:
        if key != "datasource":
            continue
        uid = value.get("uid") if isinstance(value, dict) else value
        failures.check(uid in allowed_uids, f"hard-coded data source {value!r}")
    queries = [v for k, v in pairs if k == "expr" and isinstance(v, str)]
    queries += [v for k, v in pairs if k == "definition" and isinstance(v, str)]
    failures.check(queries, "no queries found")
    implicit = {"instance", "job"}
    used = set()
    for query in queries:
        names = set(re.findall(r"\b(weir_[a-z0-9_]+)\b", query))
        used |= names
        for name in sorted(names - metrics.keys()):
            failures.add(f"unknown metric {name} in: {query}")
        known = [metrics[n] for n in names if n in metrics]
        available = set().union(*known) | implicit if known else implicit
        for name, matchers in re.findall(r"\b(weir_[a-z0-9_]+)\{([^}]*)\}", query):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                failures.check(label in metrics.get(name, set()) | implicit,
                               f"{name} has no label {label}: {query}")
        for group in re.findall(r"\bby\s*\(([^)]*)\)", query):
            for label in (l.strip() for l in group.split(",") if l.strip()):
                failures.check(label in available, f"grouping by {label}, which none of its metrics has: {query}")
    return failures.finish(f"{len(used)} of {len(metrics)} weir series used")


def cmd_promql(_args):
    """Every dashboard query is valid PromQL: Grafana's variables are filled in, each query
    becomes a recording rule, and promtool parses them."""
    if shutil.which("promtool") is None:
        print("promtool is not installed (apt-get install prometheus)")
        return SKIPPED
    need_yaml()
    dashboard = json.loads(Path("deploy/grafana/weir-dashboard.json").read_text())
    queries = [v for k, v in walk(dashboard, []) if k == "expr" and isinstance(v, str)]
    values = {"__rate_interval": "1m", "__interval": "30s", "__range": "1h"}
    filled = [re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), ".*"), q) for q in queries]
    rules = {"groups": [{"name": "weir-dashboard", "rules": [
        {"record": f"weir_dashboard:query_{i}", "expr": q} for i, q in enumerate(filled)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(rules, f)
    try:
        result = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if result.returncode != 0:
        lines = (result.stderr + result.stdout).replace(f.name, "dashboard queries").splitlines()
        print("\n".join(l for l in lines if l.strip() and not l.startswith("Checking") and l.strip() != "FAILED:"))
        return FAILED
    print(f"{len(filled)} queries parsed by promtool")
    return OK


# --- weir configs -------------------------------------------------------------------------------

def referenced_files(config):
    """(kind, path) for every file a weir config names and `weir check` reads."""
    refs = []

    def tls(table):
        if not table:
            return
        refs.append(("cert", table.get("cert_file")))
        refs.append(("key", table.get("key_file")))
        if table.get("client_ca_file"):
            refs.append(("ca", table["client_ca_file"]))
        for crl in table.get("crl_files", []):
            refs.append(("crl", crl))

    tls(config.get("ops", {}).get("tls"))
    for listener in config.get("listeners", []):
        tls(listener.get("tls"))
        auth = listener.get("auth") or {}
        if auth.get("password_file"):
            refs.append(("password", auth["password_file"]))
        if (auth.get("jwt") or {}).get("key_file"):
            refs.append(("jwt", auth["jwt"]["key_file"]))
    if config.get("sink", {}).get("tls_ca_file"):
        refs.append(("ca", config["sink"]["tls_ca_file"]))
    return [(kind, path) for kind, path in refs if path]


def make_test_certificate(directory):
    """A self-signed CA certificate and its key: serves as server certificate and as client CA."""
    cert, key = directory / "stub-cert.pem", directory / "stub-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=weir-deploy-check",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "subjectAltName=DNS:weir"],
        check=True, capture_output=True)
    return cert, key


def cmd_weir_check(args):
    """`weir check` on one config. Files it names that are deployment secrets (password files,
    certificates, keys) and do not exist beside it are stubbed in a temporary copy: an empty
    password file, a throwaway self-signed certificate."""
    weir, path = args[0], Path(args[1])
    config = tomllib.loads(path.read_text())
    missing = []
    for kind, ref in referenced_files(config):
        ref_path = Path(ref)
        if ref_path.is_absolute():
            if not ref_path.exists():
                print(f"names {ref}, which does not exist here and cannot be stubbed (absolute path)")
                return SKIPPED
            continue
        if not (path.parent / ref_path).exists():
            missing.append((kind, ref_path))
    target, notes = path, ""
    with tempfile.TemporaryDirectory(prefix="weir-deploy-check-") as temp:
        if missing:
            temp = Path(temp)
            if any(kind in ("crl", "jwt") for kind, _ in missing):
                print("names a CRL or JWT key that does not exist; no stub for those")
                return SKIPPED
            certificate = None
            for kind, ref in missing:
                destination = temp / ref
                destination.parent.mkdir(parents=True, exist_ok=True)
                if kind == "password":
                    destination.write_text("# stub: no users\n")
                    continue
                if certificate is None:
                    if shutil.which("openssl") is None:
                        print("names certificates that are not in the repository, and openssl is not installed to stub them")
                        return SKIPPED
                    certificate = make_test_certificate(temp)
                shutil.copyfile(certificate[1] if kind == "key" else certificate[0], destination)
            for kind, ref in referenced_files(config):
                source = path.parent / ref
                if not Path(ref).is_absolute() and source.exists():
                    (temp / ref).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, temp / ref)
            target = temp / path.name
            shutil.copyfile(path, target)
            notes = "stubbed " + ", ".join(sorted({str(ref) for _, ref in missing}))
        result = subprocess.run([weir, "check", "--config", str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"weir check exit {result.returncode}: {(result.stderr or result.stdout).strip()}")
        return FAILED
    return OK if not notes else (print(notes) or OK)


COMMANDS = {
    "yaml": cmd_yaml,
    "k8s": cmd_k8s,
    "grace": cmd_grace,
    "compose": cmd_compose,
    "dockerfile": cmd_dockerfile,
    "grafana": cmd_grafana,
    "promql": cmd_promql,
    "weir-check": cmd_weir_check,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(COMMANDS)}}} [args]")
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
