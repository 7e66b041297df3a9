"""Offline checks of deploy/: the files parse, validate against their tools' schemas,
and agree with each other and with the real `gateway` CLI (subcommands, flags,
GATEWAY_<FLAG> variables, ports, probe paths, scrape targets, topic names).

Each checker returns a list of problems; the negative tests feed broken copies to
the same checkers, so a checker that stops finding problems fails the suite.
External tools: promtool (Debian `prometheus`), haproxy (Debian `haproxy`),
systemd-analyze (systemd); a test that needs an absent tool is skipped.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import kubernetes_validate
import pytest
import yaml

from gateway.cli import PASSWORD_ENV

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
GATEWAY_IMAGES = ("gateway:", "registry.example.com/gateway:")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


# ---------------------------------------------------------------- helpers


@dataclass
class Invocation:
    """One `gateway ...` command line as a deployment runs it, with its environment."""

    source: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def flag(self, name: str) -> list[str]:
        """Values given to --name (both `--name V` and `--name=V`)."""
        values = []
        for i, arg in enumerate(self.argv):
            if arg == name and i + 1 < len(self.argv):
                values.append(self.argv[i + 1])
            elif arg.startswith(name + "="):
                values.append(arg.split("=", 1)[1])
        return values

    def hostport(self, name: str) -> tuple[str, int] | None:
        values = self.flag(name) or ([self.env[env_name(name)]] if env_name(name) in self.env else [])
        if not values:
            return None
        host, _, port = values[-1].rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def subcommand(self) -> str:
        return self.argv[1] if len(self.argv) > 1 else ""


def env_name(flag: str) -> str:
    return "GATEWAY_" + flag.lstrip("-").upper().replace("-", "_")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


K8S_SECRET_TEMPLATE = DEPLOY / "templates" / "k8s-secret.yaml"


def load_k8s(*, with_secret: bool = True) -> list[dict]:
    """What `kubectl apply -f deploy/k8s/` applies, plus (with_secret) the Secret the operator
    creates from its template beforehand."""
    paths = sorted((DEPLOY / "k8s").glob("*.yaml")) + ([K8S_SECRET_TEMPLATE] if with_secret else [])
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def interpolate(text: str) -> str:
    """Compose variable interpolation with a dummy value for every ${VAR...}."""
    return re.sub(r"\$\{(\w+)[^}]*\}", lambda m: f"dummy-{m.group(1).lower()}", text).replace("$$", "$")


def load_compose(text: str | None = None) -> dict:
    return yaml.safe_load(interpolate(text if text is not None else (DEPLOY / "compose.yaml").read_text()))


@contextmanager
def environ(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ with exactly these GATEWAY_* variables (the runner's own removed)."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def envvar_names(param: click.Parameter, ctx: click.Context) -> set[str]:
    names = {param.envvar} if isinstance(param.envvar, str) else set(param.envvar or ())
    if isinstance(param, click.Option) and param.allow_from_autoenv and ctx.auto_envvar_prefix and param.name:
        names.add(f"{ctx.auto_envvar_prefix}_{param.name.upper()}")
    return names


def cli_problems(root: click.Command, inv: Invocation) -> list[str]:
    """Parse the invocation with the real click command, environment included."""
    if Path(inv.argv[0]).name != "gateway":
        return [f"{inv.source}: runs {inv.argv[0]!r}, not gateway"]
    problems: list[str] = []
    known_env: set[str] = set()
    with environ(inv.env):
        try:
            ctx = root.make_context("gateway", list(inv.argv[1:]))
            cmd = root
            while True:
                known_env |= {n for p in cmd.params for n in envvar_names(p, ctx)}
                if any(p.name == "kafka" for p in cmd.params):
                    known_env.add(PASSWORD_ENV)  # read by the Kafka settings, not by an option
                if not isinstance(cmd, click.Group):
                    break
                protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
                args = [*protected, *ctx.args]
                name, cmd, rest = cmd.resolve_command(ctx, args)
                ctx = cmd.make_context(name, rest, parent=ctx)
        except click.ClickException as exc:
            return [f"{inv.source}: {' '.join(inv.argv)}: {exc.format_message()}"]
    for key in sorted(inv.env):
        if key.startswith("GATEWAY_") and key not in known_env:
            problems.append(f"{inv.source}: {key} is read by no option of `{' '.join(inv.argv[:2])}`")
    return problems


# ---------------------------------------------------------------- Dockerfile


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions (NAME, arguments) grouped by build stage."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, args = line.partition(" ")
        if name.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((name.upper(), args.strip()))
    return stages


def healthcheck_port(text: str) -> int | None:
    for name, args in dockerfile_stages(text)[-1]:
        if name == "HEALTHCHECK":
            match = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)/healthz", args)
            return int(match.group(1)) if match else None
    return None


def dockerfile_problems(text: str) -> list[str]:
    stages = dockerfile_stages(text)
    if len(stages) < 2:
        return ["not a multi-stage build"]
    problems = []
    final = dict(stages[-1])  # last instruction of each kind wins, as in Docker
    build_names = [stage[0][1].split()[-1] for stage in stages[:-1] if " AS " in stage[0][1].upper()]
    if not re.match(r"python:\$\{PYTHON_VERSION\}-slim|python:3\.1[1-9][.\d]*-slim", final["FROM"]):
        problems.append(f"runtime stage is not python slim: {final['FROM']}")
    if not any(f"from={name}" in args for name in build_names for _, args in stages[-1]):
        problems.append("runtime stage takes nothing from the build stage")
    if any(n == "RUN" and re.search(r"\b(gcc|build-essential)\b", a) for n, a in stages[-1]):
        problems.append("compiler in the runtime stage")
    user = final.get("USER", "root").split(":")[0]
    if user in ("root", "0"):
        problems.append(f"runtime runs as {user}")
    if "HEALTHCHECK" not in final:
        problems.append("no HEALTHCHECK")
    else:
        if "/healthz" not in final["HEALTHCHECK"] or "urllib" not in final["HEALTHCHECK"]:
            problems.append("HEALTHCHECK does not GET /healthz with urllib")
        if re.search(r"\b(curl|wget)\b", final["HEALTHCHECK"]):
            problems.append("HEALTHCHECK uses a tool slim images lack")
    try:
        entrypoint = json.loads(final.get("ENTRYPOINT", "null"))
    except json.JSONDecodeError:
        entrypoint = None
    if entrypoint != ["gateway"]:
        problems.append(f"ENTRYPOINT is not exec-form [\"gateway\"]: {final.get('ENTRYPOINT')}")
    for stage in stages:
        for name, args in stage:
            if name == "COPY" and "--from" not in args:
                for src in args.split()[:-1]:
                    if not src.startswith("--") and not (ROOT / src).exists():
                        problems.append(f"COPY source {src} does not exist in the repository")
    return problems


def test_dockerfile_is_multistage_nonroot_with_healthcheck_and_entrypoint() -> None:
    assert dockerfile_problems((DEPLOY / "Dockerfile").read_text()) == []


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [ln for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert patterns[0] == "*"  # an allowlist: .venv, .git, caches never enter the context
    assert {"!gateway", "!pyproject.toml", "!README.md"} <= set(patterns)


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("USER 10001:10001", "USER root", "runs as root"),
        ('ENTRYPOINT ["gateway"]', "ENTRYPOINT gateway", "ENTRYPOINT"),
        ("/healthz", "/", "HEALTHCHECK"),
        ("FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime", "FROM python:3.11 AS runtime", "slim"),
    ],
)
def test_dockerfile_checker_finds_breakage(old: str, new: str, expected: str) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert old in text
    assert any(expected in p for p in dockerfile_problems(text.replace(old, new)))


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli() -> click.Command:
    from gateway.cli import cli as root

    return root


# ---------------------------------------------------------------- compose


GATEWAY_SERVICES_BUILT_FROM = "deploy/Dockerfile"


def compose_invocations(compose: dict) -> dict[str, Invocation]:
    """The services that run the gateway image, by name."""
    out = {}
    for name, svc in compose["services"].items():
        build = svc.get("build") or {}
        if build.get("dockerfile") == GATEWAY_SERVICES_BUILT_FROM or str(svc.get("image", "")).startswith(GATEWAY_IMAGES):
            env = svc.get("environment") or {}
            if isinstance(env, list):
                env = dict(item.split("=", 1) for item in env)
            out[name] = Invocation(f"compose:{name}", ["gateway", *map(str, svc.get("command") or [])], {k: str(v) for k, v in env.items()})
    return out


def haproxy_servers(cfg: str) -> list[tuple[str, str, str, int, int | None]]:
    """(backend, server name, host, port, check port) of every `server` line."""
    servers, backend = [], ""
    for line in cfg.splitlines():
        words = line.split("#")[0].split()
        if words[:1] == ["backend"]:
            backend = words[1]
        elif words[:1] == ["server"]:
            host, _, port = words[2].rpartition(":")
            check = int(words[words.index("port") + 1]) if "port" in words else None
            servers.append((backend, words[1], host, int(port), check))
    return servers


def compose_problems(root: click.Command, compose: dict, haproxy_cfg: str, prometheus: dict, dockerfile: str) -> list[str]:
    services = compose["services"]
    invs = compose_invocations(compose)
    problems = [p for inv in invs.values() for p in cli_problems(root, inv)]
    serve = {n: inv for n, inv in invs.items() if inv.subcommand == "serve"}
    if len(serve) < 2:
        problems.append(f"compose runs {len(serve)} gateways, expected at least 2 behind the LB")
    if sum(inv.subcommand == "materialize" for inv in invs.values()) != 1:
        problems.append("compose must run exactly one materializer (single writer)")

    def listen_port(name: str, flag: str = "--listen") -> int | None:
        hp = invs[name].hostport(flag) if name in invs else None
        return hp[1] if hp else None

    health_port = healthcheck_port(dockerfile)
    for name, inv in invs.items():
        if inv.subcommand in ("serve", "materialize") and "healthcheck" not in services[name]:
            if listen_port(name, "--admin-listen") != health_port:
                problems.append(f"{name}: admin port {listen_port(name, '--admin-listen')} but the image HEALTHCHECK polls {health_port}")
        for kafka in inv.flag("--kafka"):
            host, _, port = kafka.rpartition(":")
            if f"://{host}:{port}" not in advertised_listeners(services.get(host) or {}):
                problems.append(f"{name}: --kafka {kafka} is no advertised listener of a compose service")
    for name, inv in serve.items():
        for url in inv.flag("--upstream"):
            parts = urlsplit(url)
            if parts.hostname not in invs or listen_port(parts.hostname) != parts.port:
                problems.append(f"{name}: upstream {url} is no gateway-image service listening there")
        admin = inv.hostport("--admin-listen")
        if admin and admin[0] not in LOOPBACK and "GATEWAY_ADMIN_TOKEN" not in inv.env and not inv.flag("--admin-token"):
            problems.append(f"{name}: admin listener on {admin[0]} without an admin token")
        trusted = [ipaddress.ip_network(c) for c in inv.flag("--trusted-proxy")]
        for svc_name, svc in services.items():
            if "haproxy" in str(svc.get("image", "")):
                addrs = [n.get("ipv4_address") for n in (svc.get("networks") or {}).values() if isinstance(n, dict)]
                if not any(a and any(ipaddress.ip_address(a) in net for net in trusted) for a in addrs):
                    problems.append(f"{name}: load balancer {svc_name} is not a --trusted-proxy (client IPs would be the LB's)")

    servers = haproxy_servers(haproxy_cfg)
    behind_lb = set()
    for backend, server, host, port, check in servers:
        if host not in serve:
            problems.append(f"haproxy {backend}/{server}: {host} is not a gateway service")
            continue
        if port not in (listen_port(host), listen_port(host, "--admin-listen")):
            problems.append(f"haproxy {backend}/{server}: port {port} is neither --listen nor --admin-listen of {host}")
        if port == listen_port(host):
            behind_lb.add(host)
            sends_proxy = any(f"server {server} " in line and "send-proxy" in line for line in haproxy_cfg.splitlines())
            if sends_proxy != ("--proxy-protocol" in serve[host].argv):
                problems.append(f"haproxy {backend}/{server}: send-proxy and {host}'s --proxy-protocol disagree")
        if (check or port) != listen_port(host, "--admin-listen"):
            problems.append(f"haproxy {backend}/{server}: health check port {check or port} is not {host}'s admin port")
    if behind_lb != set(serve):
        problems.append(f"gateways not behind the LB: {sorted(set(serve) - behind_lb)}")
    if "option httpchk GET /readyz" not in haproxy_cfg:
        problems.append("haproxy does not route by /readyz")

    scraped = set()
    for job in prometheus["scrape_configs"]:
        if job.get("metrics_path", "/metrics") != "/metrics":
            problems.append(f"prometheus job {job['job_name']} scrapes {job['metrics_path']}")
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                if listen_port(host, "--admin-listen") != int(port):
                    problems.append(f"prometheus target {target} is no admin listener")
                scraped.add(host)
    missing = {n for n, inv in invs.items() if inv.subcommand in ("serve", "materialize")} - scraped
    if missing:
        problems.append(f"not scraped by prometheus: {sorted(missing)}")
    return problems


def broker_properties(service: dict) -> dict[str, str]:
    """The Kafka service's settings: its server.properties file input (deploy/kafka/), then KAFKA_* env."""
    props: dict[str, str] = {}
    for volume in service.get("volumes") or []:
        source, _, target = str(volume).partition(":")
        if target.startswith("/mnt/shared/config/server.properties"):
            for line in (DEPLOY / source).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    props[key.strip()] = value.strip()
    for key, value in (service.get("environment") or {}).items():
        if key.startswith("KAFKA_") and key != "KAFKA_OPTS":
            props[key[6:].lower().replace("_", ".")] = str(value)
    return props


def advertised_listeners(service: dict) -> str:
    return broker_properties(service).get("advertised.listeners", "")


def topic_problems(root: click.Command, script: str, where: str) -> list[str]:
    """The topic set-up script creates the CLI's default topics with the design's policies."""
    serve = root.commands["serve"]  # type: ignore[attr-defined]
    defaults = {p.name: p.default for p in serve.params}
    problems = []
    wanted = {
        defaults.get("commands_topic"): ["--partitions 1", "retention.ms=-1"],
        defaults.get("ranges_topic"): ["cleanup.policy=compact"],
    }
    creates = re.findall(r"--create .*?--topic (\S+)(.*?)(?=\n\S|\n\s*\$|\Z)", script, re.S)
    created = {topic: body for topic, body in creates}
    for topic, settings in wanted.items():
        if topic not in created:
            problems.append(f"{where}: topic {topic} (CLI default) is not created")
            continue
        for setting in settings:
            if setting not in created[topic]:
                problems.append(f"{where}: topic {topic} is created without {setting}")
    return problems


@pytest.fixture(scope="module")
def compose_inputs() -> tuple[dict, str, dict, str]:
    return (
        load_compose(),
        (DEPLOY / "haproxy" / "haproxy.cfg").read_text(),
        load_yaml(DEPLOY / "prometheus" / "prometheus.yml"),
        (DEPLOY / "Dockerfile").read_text(),
    )


def test_compose_agrees_with_cli_lb_prometheus_and_image(cli: click.Command, compose_inputs: tuple) -> None:
    assert compose_problems(cli, *compose_inputs) == []


def test_compose_creates_the_design_topics(cli: click.Command) -> None:
    script = load_compose()["services"]["topics"]["command"][-1]
    assert topic_problems(cli, script, "compose") == []


def test_compose_publishes_admin_and_prometheus_on_loopback_only() -> None:
    services = load_compose()["services"]
    published = [(n, str(p)) for n, s in services.items() for p in s.get("ports", [])]
    assert [p for _, p in published if p.count(":") == 1 and not p.startswith("8080:")] == []
    assert ("lb", "8080:8080") in published


def test_compose_gateways_wait_for_topics_and_bidder() -> None:
    services = load_compose()["services"]
    for name in ("gateway-a", "gateway-b", "materializer"):
        assert services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def mutate_command(compose: dict, service: str, old: str, new: str) -> dict:
    broken = copy.deepcopy(compose)
    cmd = broken["services"][service]["command"]
    broken["services"][service]["command"] = [new if a == old else a for a in cmd]
    assert broken["services"][service]["command"] != cmd
    return broken


@pytest.mark.parametrize(
    "service, old, new, expected",
    [
        ("gateway-a", "--upstream", "--upstreams", "No such option"),
        ("gateway-a", "serve", "serv", "No such command"),
        ("gateway-b", "0.0.0.0:8081", "0.0.0.0:8091", "admin port"),
        ("gateway-a", "http://bidder:9000", "http://bidder:9001", "upstream"),
        ("materializer", "kafka:9093", "kafka:9094", "advertised listener"),
        ("gateway-a", "172.28.0.10/32", "172.28.0.11/32", "trusted-proxy"),
    ],
)
def test_compose_checker_finds_breakage(cli: click.Command, compose_inputs: tuple, service: str, old: str, new: str, expected: str) -> None:
    compose, *rest = compose_inputs
    problems = compose_problems(cli, mutate_command(compose, service, old, new), *rest)
    assert any(expected in p for p in problems), problems


def test_compose_checker_finds_unknown_env_and_lb_mismatch(cli: click.Command, compose_inputs: tuple) -> None:
    compose, haproxy_cfg, prometheus, dockerfile = compose_inputs
    broken = copy.deepcopy(compose)
    broken["services"]["gateway-a"]["environment"]["GATEWAY_NO_SUCH_FLAG"] = "1"
    assert any("GATEWAY_NO_SUCH_FLAG" in p for p in compose_problems(cli, broken, haproxy_cfg, prometheus, dockerfile))
    bad_lb = haproxy_cfg.replace("server gateway-b gateway-b:8080", "server gateway-b gateway-b:8090")
    assert any("port 8090" in p for p in compose_problems(cli, compose, bad_lb, prometheus, dockerfile))
    no_proxy_protocol = haproxy_cfg.replace("gateway-a:8080 check port 8081 send-proxy-v2", "gateway-a:8080 check port 8081")
    assert any("--proxy-protocol disagree" in p for p in compose_problems(cli, compose, no_proxy_protocol, prometheus, dockerfile))
    bad_prom = copy.deepcopy(prometheus)
    bad_prom["scrape_configs"][0]["static_configs"][0]["targets"] = ["gateway-a:8080"]
    problems = compose_problems(cli, compose, haproxy_cfg, bad_prom, dockerfile)
    assert any("gateway-a:8080 is no admin listener" in p for p in problems)
    assert any("not scraped" in p and "gateway-b" in p for p in problems)


def test_topic_checker_finds_missing_policy(cli: click.Command) -> None:
    script = load_compose()["services"]["topics"]["command"][-1]
    assert topic_problems(cli, script.replace("--config cleanup.policy=compact", ""), "x")


# ---------------------------------------------------------------- HAProxy


def haproxy_check(cfg: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "haproxy.cfg"
    path.write_text(cfg)
    run = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=20)
    noise = re.compile(r"could not resolve address|^\[NOTICE\]|^Warnings were found|^Configuration file is valid|^$")
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if not noise.search(ln)]
    return lines + ([f"haproxy -c exited {run.returncode}"] if run.returncode else [])


@pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy not installed (Debian package haproxy)")
def test_haproxy_config_is_valid(tmp_path: Path) -> None:
    assert haproxy_check((DEPLOY / "haproxy" / "haproxy.cfg").read_text(), tmp_path) == []


@pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy not installed (Debian package haproxy)")
def test_haproxy_check_finds_breakage(tmp_path: Path) -> None:
    cfg = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert haproxy_check(cfg.replace("balance leastconn", "balance fastest"), tmp_path)


# ---------------------------------------------------------------- Prometheus

needs_promtool = pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (Debian package prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=30)


@needs_promtool
def test_prometheus_config_and_rules_are_valid() -> None:
    run = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert run.returncode == 0, run.stdout + run.stderr
    run = promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_alerts_fire_on_the_failures_they_name() -> None:
    """alerts.test.yml: stale view, poison record, upstream errors, not ready, materializer down."""
    run = promtool("test", "rules", str(DEPLOY / "prometheus" / "alerts.test.yml"))
    assert run.returncode == 0, run.stdout + run.stderr


def test_alert_rules_cover_the_operational_failures() -> None:
    rules = [r for g in load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"] for r in g["rules"]]
    exprs = " ".join(r["expr"] for r in rules)
    for needle in ("gateway_view_age_seconds", "gateway_view_lag_records", "gateway_poison_records_total",
                   'outcome="upstream_error"', 'outcome="shed"', "gateway_ready", "gateway_kafka_connection_failing"):
        assert needle in exprs, needle
    assert all(r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"] for r in rules)


@needs_promtool
def test_promtool_rejects_a_bad_rule(tmp_path: Path) -> None:
    text = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    broken = tmp_path / "alerts.yml"
    broken.write_text(text.replace("expr: gateway_view_age_seconds > 120", "expr: gateway_view_age_seconds >> 120"))
    run = promtool("check", "rules", str(broken))
    assert run.returncode != 0


# ---------------------------------------------------------------- Kubernetes


def k8s_schema_problems(docs: list[dict]) -> list[str]:
    problems = []
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(map(str, exc.path))
                problems.append(f"{doc.get('kind')}/{doc['metadata'].get('name')} (k8s {version}) {path}: {exc.message}")
    return problems


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]


def k8s_invocations(docs: list[dict]) -> list[tuple[dict, dict, Invocation, list[str]]]:
    """(workload, container, invocation, problems resolving its env) of gateway-image containers."""
    config_maps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    out = []
    for workload, template in pod_specs(docs):
        for c in template["spec"]["containers"]:
            if not c["image"].startswith(GATEWAY_IMAGES):
                continue
            where = f"{workload['kind']}/{workload['metadata']['name']}"
            env, problems = {}, []
            for src in c.get("envFrom", []):
                name = src["configMapRef"]["name"] if "configMapRef" in src else src["secretRef"]["name"]
                store = config_maps if "configMapRef" in src else secrets
                if name not in store:
                    problems.append(f"{where}: envFrom {name} does not exist")
                    continue
                env.update(store[name].get("data") or {})
                env.update(store[name].get("stringData") or {})
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef") or var.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    store = secrets if "secretKeyRef" in var["valueFrom"] else config_maps
                    data = {**(store.get(ref["name"], {}).get("data") or {}), **(store.get(ref["name"], {}).get("stringData") or {})}
                    if ref["key"] not in data:
                        problems.append(f"{where}: {var['name']} refers to missing {ref['name']}/{ref['key']}")
                    env[var["name"]] = "from-ref"
                else:
                    env[var["name"]] = str(var.get("value", ""))
            out.append((workload, c, Invocation(where, ["gateway", *c.get("args", [])], env), problems))
    return out


def container_port(container: dict, port: int | str) -> int | None:
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    return None


def k8s_problems(root: click.Command, docs: list[dict]) -> list[str]:
    problems = k8s_schema_problems(docs)
    deployments = by_kind(docs, "Deployment")
    for workload, c, inv, env_problems in k8s_invocations(docs):
        problems += env_problems + cli_problems(root, inv)
        where = inv.source
        admin = inv.hostport("--admin-listen")
        if not admin or admin[0] in LOOPBACK:
            problems.append(f"{where}: admin listener {admin} is unreachable for probes and Prometheus")
            continue
        if container_port(c, "admin") != admin[1]:
            problems.append(f"{where}: containerPort admin {container_port(c, 'admin')} != --admin-listen port {admin[1]}")
        if inv.subcommand == "serve":
            listen = inv.hostport("--listen")
            if not listen or container_port(c, "http") != listen[1]:
                problems.append(f"{where}: containerPort http {container_port(c, 'http')} != --listen {listen}")
            if inv.env.get("GATEWAY_ADMIN_TOKEN") != "from-ref":
                problems.append(f"{where}: GATEWAY_ADMIN_TOKEN does not come from a Secret")
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = c.get(probe, {}).get("httpGet", {})
            if get.get("path") != path:
                problems.append(f"{where}: {probe} path {get.get('path')} is not {path}")
            if container_port(c, get.get("port", -1)) != admin[1]:
                problems.append(f"{where}: {probe} port {get.get('port')} is not the admin port {admin[1]}")
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/port") != str(admin[1]):
            problems.append(f"{where}: prometheus.io/port {annotations.get('prometheus.io/port')} is not the admin port")

    def selected(selector: dict) -> list[dict]:
        return [d for d in deployments.values()
                if selector and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]

    for name, svc in by_kind(docs, "Service").items():
        pods = selected(svc["spec"].get("selector", {}))
        if not pods:
            problems.append(f"Service/{name} selects no Deployment")
        for port in svc["spec"]["ports"]:
            for d in pods:
                if not any(container_port(c, port.get("targetPort", port["port"])) for c in d["spec"]["template"]["spec"]["containers"]):
                    problems.append(f"Service/{name} targetPort {port.get('targetPort')} is no port of {d['metadata']['name']}")
    for name, pdb in by_kind(docs, "PodDisruptionBudget").items():
        if not selected(pdb["spec"]["selector"]["matchLabels"]):
            problems.append(f"PodDisruptionBudget/{name} selects no Deployment")
    for name, hpa in by_kind(docs, "HorizontalPodAutoscaler").items():
        target = deployments.get(hpa["spec"]["scaleTargetRef"]["name"])
        if not target:
            problems.append(f"HorizontalPodAutoscaler/{name} scales a missing Deployment")
        elif "replicas" in target["spec"]:
            problems.append(f"Deployment/{target['metadata']['name']} sets replicas although an HPA owns them")
    for name, d in deployments.items():
        args = d["spec"]["template"]["spec"]["containers"][0].get("args", [])
        if args[:1] == ["materialize"] and (d["spec"].get("replicas") != 1 or d["spec"]["strategy"]["type"] != "Recreate"):
            problems.append(f"Deployment/{name}: the materializer must be 1 replica with strategy Recreate")
    return problems


def test_k8s_manifests_validate_and_agree_with_cli(cli: click.Command) -> None:
    assert k8s_problems(cli, load_k8s()) == []


def test_k8s_has_the_expected_objects() -> None:
    kinds = sorted(d["kind"] for d in load_k8s())
    for kind in ("ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret", "Service", "Job"):
        assert kind in kinds
    assert by_kind(load_k8s(), "HorizontalPodAutoscaler")["gateway"]["apiVersion"] == "autoscaling/v2"


def test_k8s_secret_is_a_marked_placeholder() -> None:
    secret = by_kind(load_k8s(), "Secret")["gateway-admin"]
    assert "REPLACE-ME" in secret["stringData"]["GATEWAY_ADMIN_TOKEN"]
    assert "PLACEHOLDER" in K8S_SECRET_TEMPLATE.read_text()


def test_k8s_apply_of_the_folder_never_overwrites_the_secret() -> None:
    """`kubectl apply -f deploy/k8s/` after `kubectl create secret` must not put a placeholder back."""
    applied = load_k8s(with_secret=False)
    assert [d["metadata"]["name"] for d in applied if d["kind"] == "Secret"] == []
    assert by_kind(load_k8s(), "Secret")  # the template the Deployment's secretKeyRef is checked against


def test_k8s_pods_never_create_topics(cli: click.Command) -> None:
    """Only the topics Job creates topics (with the cluster's replication): every gateway-image pod
    runs with GATEWAY_CREATE_TOPICS=false, and the CLI reads it as creation off."""
    invocations = k8s_invocations(load_k8s())
    assert invocations
    for _, _, inv, _ in invocations:
        assert inv.env.get("GATEWAY_CREATE_TOPICS") == "false", inv.source
        with environ(inv.env):
            ctx = cli.make_context("gateway", list(inv.argv[1:]))
            sub = cli.commands[inv.subcommand]  # type: ignore[attr-defined]
            rest = ctx._protected_args[1:] if hasattr(ctx, "_protected_args") else ctx.protected_args[1:]
            assert sub.make_context(inv.subcommand, [*rest, *ctx.args], parent=ctx).params["create_topics"] is False


def test_k8s_topics_job_creates_the_design_topics(cli: click.Command) -> None:
    job = by_kind(load_k8s(), "Job")["gateway-topics"]
    assert topic_problems(cli, job["spec"]["template"]["spec"]["containers"][0]["command"][-1], "k8s") == []


def test_k8s_schema_check_finds_wrong_types_and_unknown_fields() -> None:
    docs = load_k8s()
    deployment = copy.deepcopy(by_kind(docs, "Deployment")["gateway"])
    deployment["spec"]["revisionHistoryLimit"] = "five"
    assert any("revisionHistoryLimit" in p for p in k8s_schema_problems([deployment]))
    deployment = copy.deepcopy(by_kind(docs, "Deployment")["gateway"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert k8s_schema_problems([deployment])


def gateway_container(docs: list[dict]) -> dict:
    return by_kind(docs, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: gateway_container(d)["readinessProbe"]["httpGet"].update(path="/healthz"), "readinessProbe path"),
        (lambda d: gateway_container(d)["livenessProbe"]["httpGet"].update(port="http"), "livenessProbe port"),
        (lambda d: gateway_container(d)["args"].__setitem__(4, "127.0.0.1:8081"), "unreachable"),
        (lambda d: gateway_container(d)["args"].__setitem__(2, "0.0.0.0:9090"), "containerPort http"),
        (lambda d: gateway_container(d)["args"].append("--no-such-flag"), "No such option"),
        (lambda d: by_kind(d, "ConfigMap")["gateway-serve"]["data"].update(GATEWAY_BUDGET="5"), "GATEWAY_BUDGET"),
        (lambda d: by_kind(d, "ConfigMap")["gateway-serve"]["data"].update(GATEWAY_SERVE_WORKERS="many"), "workers"),
        (lambda d: gateway_container(d)["env"][0]["valueFrom"]["secretKeyRef"].update(key="TOKEN"), "missing"),
        (lambda d: by_kind(d, "Service")["gateway-admin"]["spec"]["ports"][0].update(targetPort=9999), "targetPort"),
        (lambda d: by_kind(d, "Deployment")["gateway-materializer"]["spec"].update(replicas=2), "Recreate"),
    ],
)
def test_k8s_checker_finds_breakage(cli: click.Command, mutate: Any, expected: str) -> None:
    docs = copy.deepcopy(load_k8s())
    mutate(docs)
    problems = k8s_problems(cli, docs)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------- systemd


def systemd_units() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((DEPLOY / "systemd").glob("*.service"))}


def unit_settings(text: str, key: str) -> list[str]:
    return [ln.split("=", 1)[1].strip() for ln in text.splitlines() if ln.startswith(key + "=")]


def env_file(path: Path) -> dict[str, str]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return dict(ln.split("=", 1) for ln in lines)


def systemd_invocations(units: dict[str, str]) -> list[Invocation]:
    out = []
    for name, text in units.items():
        env: dict[str, str] = {}
        for ref in unit_settings(text, "EnvironmentFile"):
            example = DEPLOY / "systemd" / (Path(ref.lstrip("-")).name + ".example")
            env.update(env_file(example) if example.exists() else {})
        out.append(Invocation(f"systemd:{name}", shlex.split(unit_settings(text, "ExecStart")[0]), env))
    return out


def systemd_problems(root: click.Command, units: dict[str, str]) -> list[str]:
    problems = []
    invs = systemd_invocations(units)
    for inv in invs:
        problems += cli_problems(root, inv)
    admin_ports = [inv.hostport("--admin-listen") for inv in invs]
    ports = [hp[1] for hp in admin_ports if hp] + [hp[1] for inv in invs if (hp := inv.hostport("--listen"))]
    if len(ports) != len(set(ports)):
        problems.append(f"units on one host share a port: {ports}")
    for name, text in units.items():
        for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("DynamicUser", "yes")):
            if value not in unit_settings(text, key):
                problems.append(f"{name}: missing {key}={value}")
        if not unit_settings(text, "EnvironmentFile"):
            problems.append(f"{name}: no EnvironmentFile")
    return problems


def systemd_verify(text: str, tmp_path: Path) -> list[str]:
    """systemd-analyze verify, with the ExecStart binary pointed at a stand-in."""
    exe = tmp_path / "bin" / "gateway"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / "unit-under-test.service"
    unit.write_text(text.replace("/opt/gateway/bin/gateway", str(exe)))
    run = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=20)
    return [ln for ln in (run.stdout + run.stderr).splitlines() if ln.strip()] + ([f"exit {run.returncode}"] if run.returncode else [])


def test_systemd_units_agree_with_cli(cli: click.Command) -> None:
    assert systemd_problems(cli, systemd_units()) == []


def test_systemd_env_examples_hold_no_real_token() -> None:
    assert "REPLACE-ME" in env_file(DEPLOY / "systemd" / "gateway.env.example")["GATEWAY_ADMIN_TOKEN"]


def test_systemd_checker_finds_breakage(cli: click.Command) -> None:
    units = systemd_units()
    broken = dict(units, **{"gateway.service": units["gateway.service"].replace("--snapshot", "--snap-shot")})
    assert any("No such option" in p for p in systemd_problems(cli, broken))
    clash = units["gateway-materializer.service"].replace("127.0.0.1:8082", "127.0.0.1:8081")
    assert any("share a port" in p for p in systemd_problems(cli, dict(units, **{"gateway-materializer.service": clash})))
    lax = units["gateway.service"].replace("ProtectSystem=strict", "ProtectSystem=full")
    assert any("ProtectSystem" in p for p in systemd_problems(cli, dict(units, **{"gateway.service": lax})))


needs_systemd = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")


@needs_systemd
@pytest.mark.parametrize("name", sorted(systemd_units()))
def test_systemd_unit_verifies(name: str, tmp_path: Path) -> None:
    assert systemd_verify(systemd_units()[name], tmp_path) == []


@needs_systemd
def test_systemd_verify_finds_bad_directives(tmp_path: Path) -> None:
    text = systemd_units()["gateway.service"]
    assert systemd_verify(text.replace("ProtectSystem=strict", "ProtectSystem=bogus"), tmp_path)
    assert systemd_verify(text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"), tmp_path)


# ---------------------------------------------------------------- the systemd guide, run


def guide_steps(section: str) -> list[str]:
    """The shell lines of the first ```sh block under `## <section>` in deploy/README.md."""
    text = (DEPLOY / "README.md").read_text()
    body = text[text.index(f"## {section}"):]
    block = re.search(r"```sh\n(.*?)```", body, re.S)
    assert block, f"no sh block under ## {section}"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def repository_copy(target: Path) -> Path:
    """The files a fresh clone has (tracked, as in the working tree): no .venv, no build leftovers."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


needs_git = pytest.mark.skipif(not (ROOT / ".git").exists() or not shutil.which("git"), reason="not a git checkout")


@needs_git
def test_the_systemd_guide_runs_in_a_scratch_root(tmp_path: Path) -> None:
    """Every step of deploy/README.md's systemd guide, in order, with / moved to a scratch root:
    the wheel builds (offline: the build backend comes from the dev extra), installs and runs,
    /etc/gateway is created before the env files go in, and nothing is left to do by hand."""
    import sys
    import sysconfig

    repo, root = repository_copy(tmp_path / "repo"), tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)  # there on every systemd host; /etc/gateway is not
    steps = guide_steps("systemd (bare hosts)")
    assert steps[-1] == "systemctl daemon-reload && systemctl enable --now gateway"  # checked, not run here
    python = f"{sys.executable} -m"
    script = ["set -eu"]
    for step in steps[:-1]:
        step = re.sub(r"(?<![\w.])/(etc|opt)/", lambda m: f"{root}/{m.group(1)}/", step)
        step = step.replace("python3 -m pip wheel", f"{python} pip wheel --no-build-isolation")  # no network in tests
        step = step.replace("python3 -m venv", f"{python} venv")
        step = step.replace("/bin/pip install", "/bin/pip install --no-deps --no-index")
        if os.geteuid() != 0:
            step = step.replace(" -o root", "")
        script.append(step)
    run = subprocess.run(["bash", "-c", "\n".join(script)], cwd=repo, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr

    (wheel,) = (repo / "dist").glob("gateway-*.whl")
    assert wheel.name.startswith("gateway-") and wheel.name.endswith("-py3-none-any.whl")
    assert (root / "etc" / "gateway" / "gateway.env").stat().st_mode & 0o777 == 0o600
    assert (root / "etc" / "gateway" / "materializer.env").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (root / "etc" / "systemd" / "system").iterdir()) == sorted(systemd_units())
    # The dependencies come from PyPI on a real host; here, from the test's own environment.
    site = next((root / "opt" / "gateway" / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n" + sysconfig.get_paths()["platlib"] + "\n")
    run = subprocess.run([str(root / "opt" / "gateway" / "bin" / "gateway"), "--version"], capture_output=True,
                         text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
    assert run.returncode == 0 and run.stdout.startswith("gateway, version "), run.stdout + run.stderr
    units = systemd_units()
    for name in units:
        assert unit_settings(units[name], "ExecStart")[0].startswith("/opt/gateway/bin/gateway ")


def test_every_unit_and_env_file_of_the_guide_exists() -> None:
    steps = " ".join(guide_steps("systemd (bare hosts)"))
    for path in re.findall(r"deploy/systemd/\S+", steps):
        assert (ROOT / path).is_file(), path
    for name in systemd_units():
        assert f"deploy/systemd/{name}" in steps
        for ref in unit_settings(systemd_units()[name], "EnvironmentFile"):
            assert ref.lstrip("-") in steps, f"{name} reads {ref}, which the guide never creates"


# ---------------------------------------------------------------- Kafka security (issue 17)


K8S_KAFKA_SECRETS = DEPLOY / "templates" / "k8s-kafka-secrets.yaml"


def kafka_settings_problems(inv: Invocation, secret_files: Mapping[str, str]) -> list[str]:
    """A gateway-image process reaches Kafka over SASL_SSL as a named principal, with its password
    and CA from files a secret provides (`secret_files`: mounted path -> what provides it), never a
    literal password in its environment or on its command line."""
    where, env = inv.source, inv.env
    problems = []
    if env.get("GATEWAY_KAFKA_SECURITY_PROTOCOL") != "SASL_SSL":
        problems.append(f"{where}: Kafka security protocol {env.get('GATEWAY_KAFKA_SECURITY_PROTOCOL')!r}, not SASL_SSL")
    if env.get("GATEWAY_KAFKA_SASL_MECHANISM") not in ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"):
        problems.append(f"{where}: no SASL mechanism")
    if not env.get("GATEWAY_KAFKA_SASL_USERNAME"):
        problems.append(f"{where}: no SASL username (principal)")
    if PASSWORD_ENV in env:
        problems.append(f"{where}: {PASSWORD_ENV} set in the manifest (use a password file from a secret)")
    if any(arg.startswith("--kafka-sasl-password") and arg != "--kafka-sasl-password-file" for arg in inv.argv):
        problems.append(f"{where}: a password on the command line")
    for var in ("GATEWAY_KAFKA_SASL_PASSWORD_FILE", "GATEWAY_KAFKA_SSL_CAFILE"):
        path = env.get(var)
        if path is None or path not in secret_files:
            problems.append(f"{where}: {var}={path} is no file a secret provides ({sorted(secret_files)})")
    return problems


def compose_secret_files(compose: dict, service: dict) -> dict[str, str]:
    """Mounted path -> secret name, for the secrets a compose service lists that are defined as files."""
    defined = compose.get("secrets") or {}
    files = {}
    for entry in service.get("secrets") or []:
        source = entry if isinstance(entry, str) else entry["source"]
        target = entry if isinstance(entry, str) else entry.get("target", source)
        if "file" in (defined.get(source) or {}):
            files[f"/run/secrets/{target}"] = source
    return files


def compose_kafka_problems(compose: dict) -> list[str]:
    problems, users = [], {}
    for name, inv in compose_invocations(compose).items():
        if inv.subcommand not in ("serve", "materialize"):
            continue
        problems += kafka_settings_problems(inv, compose_secret_files(compose, compose["services"][name]))
        users.setdefault(inv.subcommand, set()).add(inv.env.get("GATEWAY_KAFKA_SASL_USERNAME"))
        for kafka in inv.flag("--kafka"):
            host, _, port = kafka.rpartition(":")
            if f"SASL_SSL://{host}:{port}" not in advertised_listeners(compose["services"].get(host) or {}):
                problems.append(f"compose:{name}: --kafka {kafka} is no SASL_SSL listener")
    if users.get("serve", set()) & users.get("materialize", set()):
        problems.append(f"compose: gateways and the materializer share a Kafka principal {users}")
    return problems


def k8s_kafka_problems(docs: list[dict]) -> list[str]:
    secrets = by_kind(docs, "Secret")
    problems, users = [], {}
    for workload, container, inv, _ in k8s_invocations(docs):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
        files = {}
        for mount in container.get("volumeMounts", []):
            secret = (volumes.get(mount["name"]) or {}).get("secret")
            if secret:
                keys = (secrets.get(secret["secretName"]) or {}).get("stringData") or {}
                files.update({f"{mount['mountPath']}/{key}": secret["secretName"] for key in keys})
        problems += kafka_settings_problems(inv, files)
        users.setdefault(inv.subcommand, set()).add(inv.env.get("GATEWAY_KAFKA_SASL_USERNAME"))
        pod = workload["spec"]["template"]["spec"]["securityContext"]
        if files and pod.get("fsGroup") is None:
            problems.append(f"{inv.source}: secret files mounted 0440 but no fsGroup: user {pod.get('runAsUser')}"
                            " cannot read them")
    if users.get("serve", set()) & users.get("materialize", set()):
        problems.append(f"k8s: gateways and the materializer share a Kafka principal {users}")
    return problems


def test_compose_reaches_kafka_over_sasl_ssl_from_file_secrets() -> None:
    assert compose_kafka_problems(load_compose()) == []


def test_k8s_reaches_kafka_over_sasl_ssl_from_mounted_secrets() -> None:
    docs = load_k8s() + [d for d in yaml.safe_load_all(K8S_KAFKA_SECRETS.read_text()) if d]
    assert k8s_schema_problems([d for d in docs if d["kind"] == "Secret"]) == []
    assert k8s_kafka_problems(docs) == []


def test_kafka_credential_secrets_are_marked_placeholders_kept_out_of_the_applied_folder() -> None:
    templates = [d for d in yaml.safe_load_all(K8S_KAFKA_SECRETS.read_text()) if d]
    assert {d["metadata"]["name"] for d in templates} == {"gateway-kafka-serve", "gateway-kafka-materializer",
                                                          "gateway-kafka-admin"}
    assert all("REPLACE-ME" in v for d in templates for v in d["stringData"].values())
    assert not [d for d in load_k8s(with_secret=False) if d["kind"] == "Secret"]


@pytest.mark.parametrize("breaks, expected", [
    (lambda c: c["x-kafka-env"].update(GATEWAY_KAFKA_SECURITY_PROTOCOL="PLAINTEXT"), "not SASL_SSL"),
    (lambda c: c["services"]["materializer"]["environment"].update(GATEWAY_KAFKA_SASL_PASSWORD="hunter2"),
     "GATEWAY_KAFKA_SASL_PASSWORD set"),
    (lambda c: c["services"]["materializer"].update(secrets=["kafka-ca"]), "no file a secret provides"),
    (lambda c: c["services"]["materializer"]["environment"].update(GATEWAY_KAFKA_SASL_USERNAME="gateway"),
     "share a Kafka principal"),
])
def test_compose_kafka_checker_finds_breakage(breaks: Any, expected: str) -> None:
    raw = yaml.safe_load(interpolate((DEPLOY / "compose.yaml").read_text()))
    breaks(raw)
    # YAML anchors were resolved at load time: re-apply the shared Kafka settings the way the merge key does.
    for service in raw["services"].values():
        if "GATEWAY_KAFKA_SECURITY_PROTOCOL" in (service.get("environment") or {}):
            service["environment"] = {**service["environment"], **{k: v for k, v in raw["x-kafka-env"].items()
                                                                   if k == "GATEWAY_KAFKA_SECURITY_PROTOCOL"}}
    problems = compose_kafka_problems(raw)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("breaks, expected", [
    (lambda d: by_kind(d, "ConfigMap")["gateway-serve"]["data"].update(GATEWAY_KAFKA_SSL_CAFILE="/etc/ca.crt"),
     "no file a secret provides"),
    (lambda d: by_kind(d, "Deployment")["gateway-materializer"]["spec"]["template"]["spec"]["securityContext"]
     .pop("fsGroup"), "no fsGroup"),
    (lambda d: by_kind(d, "ConfigMap")["gateway-materializer"]["data"].update(GATEWAY_KAFKA_SASL_USERNAME="gateway"),
     "share a Kafka principal"),
])
def test_k8s_kafka_checker_finds_breakage(breaks: Any, expected: str) -> None:
    docs = copy.deepcopy(load_k8s() + [d for d in yaml.safe_load_all(K8S_KAFKA_SECRETS.read_text()) if d])
    breaks(docs)
    problems = k8s_kafka_problems(docs)
    assert any(expected in p for p in problems), problems


def acl_grants(text: str) -> set[tuple[str, str, str, str]]:
    """(principal, operation, resource type, resource name) of every `kafka-acls ... --add` in a
    shell text (the README's commands, compose's topics script); line continuations joined."""
    grants = set()
    for line in text.replace("\\\n", " ").splitlines():
        if "--add" not in line or "--allow-principal" not in line:
            continue
        words = shlex.split(line.replace("$$", "$"))
        value = {w: words[i + 1] for i, w in enumerate(words[:-1])}
        operations = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--operation"]
        for kind in ("--topic", "--group", "--cluster"):
            if kind in words:
                for op in operations:
                    grants.add((value["--allow-principal"], op, kind.lstrip("-"), value.get(kind, "")))
    return grants


def least_privilege_problems(grants: set[tuple[str, str, str, str]], materializer: str, where: str) -> list[str]:
    problems = []
    writers = {p for p, op, kind, name in grants if kind == "topic" and name == "blacklist.ranges" and op in ("Write", "All")}
    if writers != {materializer}:
        problems.append(f"{where}: the view topic is writable by {sorted(writers)}, not by {materializer} alone")
    if any(op == "All" for _, op, _, _ in grants):
        problems.append(f"{where}: an ALL grant")
    needed = {(materializer, "Read", "group", "gateway-materializer.blacklist.commands"),
              (materializer, "Read", "topic", "blacklist.commands"), (materializer, "Write", "topic", "blacklist.ranges")}
    if not needed <= grants:
        problems.append(f"{where}: the materializer lacks {sorted(needed - grants)}")
    return problems


def test_only_the_materializer_may_write_the_view_in_the_documented_acls() -> None:
    readme = (DEPLOY / "README.md").read_text()
    grants = acl_grants(readme.replace("$acls", "kafka-acls.sh"))
    assert least_privilege_problems(grants, "User:gateway-materializer", "deploy/README.md") == []
    assert ("User:gateway", "Read", "topic", "blacklist.ranges") in grants
    assert ("User:gateway-ctl", "Write", "topic", "blacklist.commands") in grants
    assert not [g for g in grants if g[0] == "User:gateway" and g[2] == "group"]  # followers use no group


def test_compose_grants_the_same_least_privilege() -> None:
    script = load_compose()["services"]["topics"]["command"][-1]
    grants = acl_grants(script.replace("$$a", "kafka-acls.sh").replace("$a", "kafka-acls.sh"))
    assert least_privilege_problems(grants, "User:materializer", "compose") == []
    principals = {p for p, *_ in grants}
    env = {inv.subcommand: inv.env["GATEWAY_KAFKA_SASL_USERNAME"] for inv in compose_invocations(load_compose()).values()
           if inv.subcommand in ("serve", "materialize")}
    assert {f"User:{u}" for u in env.values()} <= principals


def test_acl_checker_finds_a_second_writer_of_the_view() -> None:
    text = ("kafka-acls.sh --add --allow-principal User:gateway --operation Write --topic blacklist.ranges\n"
            "kafka-acls.sh --add --allow-principal User:m --operation Read --operation Write \\\n  --topic blacklist.ranges\n")
    assert any("writable by ['User:gateway', 'User:m']" in p for p in least_privilege_problems(acl_grants(text), "User:m", "x"))


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")
async def test_dev_secrets_give_a_broker_certificate_the_gateway_trusts(tmp_path: Path) -> None:
    """make-dev-secrets.sh, then a real TLS handshake on loopback: a server with its broker.pem,
    the gateway's own TLS context (clients.ssl_context) with its ca.crt, verifying the name `kafka`."""
    import asyncio
    import ssl

    from gateway.kafka.clients import ssl_context
    from gateway.kafka.config import KafkaConfig

    run = subprocess.run(["sh", str(DEPLOY / "kafka" / "make-dev-secrets.sh"), str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(tmp_path / "broker.pem"))
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        client = ssl_context(KafkaConfig("kafka:9093", security_protocol="SSL", ssl_cafile=str(tmp_path / "ca.crt")))
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="kafka"), 10)
        writer.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="kafka.evil"), 10)
    finally:
        server.close()
        await server.wait_closed()
    jaas = (tmp_path / "kafka_server_jaas.conf").read_text()
    for principal in ("admin", "gateway", "materializer", "ctl"):
        assert f'user_{principal}="{(tmp_path / f"{principal}.password").read_text().strip()}"' in jaas
