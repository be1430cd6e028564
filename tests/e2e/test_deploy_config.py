"""The deploy files agree with each other: compose, nginx.conf, Dockerfile, .env.example.

No Docker engine runs here, so these read the files; `nginx -t` checks the rendered
nginx.conf with Debian's nginx.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml  # PyYAML: in the `test` extras

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
DEFAULT_HEARTBEAT = 20.0
DEFAULT_GRACE = 10.0

# Every setting the server documents; .env.example must list each with a comment.
DOCUMENTED_VARIABLES = [
    "PORT", "REDIS_URL", "AWS_REGION", "AWS_COGNITO_USER_POOL_ID", "AWS_COGNITO_CLIENT_ID",
    "AWS_COGNITO_CLIENT_SECRET", "AWS_COGNITO_JWKS_URL", "AWS_COGNITO_ENDPOINT",
    "CHAT_ALLOWED_ORIGINS", "CHAT_TOKEN_USE", "CHAT_COOKIE_SECURE", "CHAT_DEV_AUTH",
    "CHAT_DEV_PASSWORD", "CHAT_DEV_KEY_FILE", "CHAT_TRUSTED_PROXIES", "CHAT_API_KEYS",
    "CHAT_MAX_MESSAGE_BYTES", "CHAT_MAX_TEXT_CHARS", "CHAT_RATE", "CHAT_BURST",
    "CHAT_HEARTBEAT", "CHAT_BACKLOG_BYTES", "CHAT_GRACE", "CHAT_HISTORY_MAXLEN",
    "CHAT_MAX_ROOMS", "CHAT_PRESENCE_TTL", "CHAT_REDIS_PREFIX", "CHAT_LOGIN_RATE",
    "CHAT_LOG_LEVEL",
]


def load_renderer() -> ModuleType:
    """Import deploy/render_nginx.py (deploy/ is not a package)."""
    path = ROOT / "deploy" / "render_nginx.py"
    spec = importlib.util.spec_from_file_location("render_nginx", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_nginx", module)
    spec.loader.exec_module(module)
    return module


render_nginx = load_renderer()


def interpolate(value: Any) -> Any:
    """Resolve compose's `${VAR:-default}` as `docker compose` would with no .env."""
    if not isinstance(value, str):
        return value
    if re.search(r"\$\{\w+(?::?\?)[^}]*\}", value):
        raise AssertionError(f"{value!r} requires a variable; compose up would fail without .env")
    value = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)
    assert "${" not in value and not re.search(r"\$\w", value), f"unresolved {value!r}"
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml, parsed."""
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    """The compose services by name."""
    result: dict[str, Any] = compose["services"]
    return result


@pytest.fixture(scope="module")
def chat_env(services: dict[str, Any]) -> dict[str, str]:
    """The chatserver service's environment, interpolated with compose defaults."""
    env = services["chatserver"]["environment"]
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(interpolate(value)) for key, value in env.items()}


@pytest.fixture(scope="module")
def nginx_conf() -> str:
    """deploy/nginx.conf with comments stripped."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    """The Dockerfile with continuation lines joined."""
    return (ROOT / "Dockerfile").read_text().replace("\\\n", " ")


def directive(conf: str, name: str) -> list[list[str]]:
    """Arguments of every `name ...;` directive in `conf`, in any block."""
    found = re.findall(rf"(?:^|[;{{}}\s]){re.escape(name)}(?:\s+([^;{{}}]*?))?\s*;", conf)
    return [args.split() for args in found]


def command_option(command: list[str], option: str) -> str | None:
    """The value after `option` in an exec-form command, or None."""
    if option in command:
        return command[command.index(option) + 1]
    return None


def chat_port(services: dict[str, Any], chat_env: dict[str, str]) -> int:
    """The port each chatserver replica listens on (CLI wins over PORT)."""
    command = services["chatserver"]["command"]
    return int(command_option(command, "--port") or chat_env.get("PORT", "3020"))


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) for each `ports:` entry."""
    result = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            result.append((entry.get("host_ip", ""), int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        result.append((host_ip, int(parts[-2]), int(parts[-1].split("/")[0])))
    return result


def test_compose_has_the_three_services(services: dict[str, Any]) -> None:
    """Compose runs redis, three chatserver replicas with two workers each, and nginx."""
    assert set(services) >= {"redis", "chatserver", "nginx"}
    chat = services["chatserver"]
    assert chat["deploy"]["replicas"] == 3
    assert command_option(chat["command"], "--workers") == "2"
    assert command_option(chat["command"], "--host") == "0.0.0.0"
    assert "build" in chat
    assert "ports" not in chat, "replicas are reached through nginx only"


def test_nginx_resolves_the_replicas_at_run_time(
    services: dict[str, Any], chat_env: dict[str, str], nginx_conf: str
) -> None:
    """proxy_pass takes `chatserver:<port>` through a variable, so Docker's DNS is asked
    again every `valid` seconds (an upstream block would resolve it once, at start)."""
    assert render_nginx.upstream_target(nginx_conf) == f"chatserver:{chat_port(services, chat_env)}"
    assert directive(nginx_conf, "proxy_pass") == [["http://$chatserver"]]
    assert not re.search(r"^\s*upstream\s", nginx_conf, re.M)
    [[server, *params]] = directive(nginx_conf, "resolver")
    assert server == "127.0.0.11", "Docker's embedded DNS"
    options = dict(p.split("=", 1) for p in params)
    assert seconds(options["valid"]) <= 5, "a replica address change must reach nginx within 10 s"
    assert options.get("ipv6") == "off"
    [[timeout]] = directive(nginx_conf, "resolver_timeout")
    assert seconds(timeout) <= 5


def test_nginx_listen_is_the_published_port(
    services: dict[str, Any], chat_env: dict[str, str], nginx_conf: str
) -> None:
    """nginx listens on the container port compose publishes, 3020 on loopback."""
    (listen,) = render_nginx.listen_addresses(nginx_conf)
    [(host_ip, host_port, container_port)] = published(services["nginx"])
    assert int(listen.rsplit(":", 1)[-1]) == container_port
    assert host_port == 3020
    assert host_ip in ("127.0.0.1", "localhost"), "dev sign-in must not face the network"
    origins = chat_env["CHAT_ALLOWED_ORIGINS"].split(",")
    assert f"http://localhost:{host_port}" in origins
    assert f"http://127.0.0.1:{host_port}" in origins


def test_nginx_proxies_websockets(chat_env: dict[str, str], nginx_conf: str) -> None:
    """HTTP/1.1 upstream, Upgrade/Connection forwarded, XFF overwritten, long read timeout,
    and a retry on another replica when one is gone or draining."""
    assert ["1.1"] in directive(nginx_conf, "proxy_http_version")
    headers = {args[0].lower(): args[1:] for args in directive(nginx_conf, "proxy_set_header")}
    assert headers["upgrade"] == ["$http_upgrade"]
    assert headers["connection"] == ["$connection_upgrade"]
    assert re.search(r"map\s+\$http_upgrade\s+\$connection_upgrade\s*\{[^}]*default\s+upgrade;",
                     nginx_conf)
    assert headers["x-forwarded-for"] == ["$remote_addr"], "one hop: a client's value is dropped"
    assert headers["host"] == ["$http_host"], "Origin checks need the port kept"
    [retry] = directive(nginx_conf, "proxy_next_upstream")
    assert {"error", "timeout", "http_502", "http_503"} <= set(retry)
    heartbeat = float(chat_env.get("CHAT_HEARTBEAT", DEFAULT_HEARTBEAT))
    [[timeout]] = directive(nginx_conf, "proxy_read_timeout")
    assert seconds(timeout) > 2 * heartbeat, "one lost ping must not cut a healthy socket"


def test_metrics_are_not_served_through_nginx(nginx_conf: str) -> None:
    """/metrics (any spelling nginx normalises to it) is answered 404 by nginx itself."""
    match = re.search(r"location\s+/metrics\s*\{([^}]*)\}", nginx_conf)
    assert match is not None, "a prefix location: /metrics/ and /metricsX too"
    assert directive(match.group(1), "return") == [["404"]]
    assert not directive(match.group(1), "proxy_pass")


def test_redis_wiring_and_health_checks(
    services: dict[str, Any], chat_env: dict[str, str], dockerfile: str
) -> None:
    """REDIS_URL names the redis service; each service is started once its dependency is healthy."""
    redis_url = urlparse(chat_env["REDIS_URL"])
    assert redis_url.hostname == "redis"
    redis_command = services["redis"].get("command", [])
    assert (redis_url.port or 6379) == int(command_option(redis_command, "--port") or 6379)
    redis_check = services["redis"]["healthcheck"]["test"]
    assert "redis-cli" in redis_check and "ping" in redis_check
    assert services["chatserver"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["nginx"]["depends_on"]["chatserver"]["condition"] == "service_healthy"

    # The replicas' check is the image's HEALTHCHECK, on /healthz at $PORT.
    assert "healthcheck" not in services["chatserver"] or services["chatserver"]["healthcheck"]
    match = re.search(r"^HEALTHCHECK\s+(.*)$", dockerfile, re.M)
    assert match is not None
    assert "/healthz" in match.group(1) and "PORT" in match.group(1)
    assert re.search(r"^ENV\s.*\bPORT=" + chat_env["PORT"] + r"\b", dockerfile, re.M)

    nginx_check = " ".join(services["nginx"]["healthcheck"]["test"])
    [(_, _, container_port)] = published(services["nginx"])
    assert f"127.0.0.1:{container_port}/healthz" in nginx_check


def test_compose_serves_local_http_with_the_dev_sign_in(chat_env: dict[str, str]) -> None:
    """Out of the box: dev sign-in allowed on 0.0.0.0 and cookies without Secure."""
    assert chat_env["CHAT_DEV_AUTH"] == "1"
    assert chat_env["CHAT_COOKIE_SECURE"] == "0"
    assert "AWS_COGNITO_USER_POOL_ID" not in chat_env


def test_client_address_is_believed_only_from_the_gateway_and_nginx(
    compose: dict[str, Any], services: dict[str, Any], chat_env: dict[str, str], nginx_conf: str
) -> None:
    """nginx believes X-Forwarded-For only from the network's gateway (Docker's port
    forwarding, i.e. the host); the replicas believe it only from nginx's fixed address."""
    (network_name,) = services["nginx"]["networks"]
    assert network_name in services["chatserver"]["networks"]
    [ipam] = compose["networks"][network_name]["ipam"]["config"]
    subnet, pool = ipaddress.ip_network(ipam["subnet"]), ipaddress.ip_network(ipam["ip_range"])
    gateway = ipaddress.ip_address(ipam["gateway"])
    nginx_ip = ipaddress.ip_address(services["nginx"]["networks"][network_name]["ipv4_address"])
    assert subnet.is_private and pool.subnet_of(subnet)  # type: ignore[arg-type]
    assert nginx_ip in subnet and nginx_ip not in pool, "replicas must never be given it"
    assert gateway in subnet and gateway not in pool and gateway != nginx_ip
    assert directive(nginx_conf, "set_real_ip_from") == [[str(gateway)]]
    assert directive(nginx_conf, "real_ip_header") == [["X-Forwarded-For"]]
    assert directive(nginx_conf, "real_ip_recursive") == [["on"]]
    trusted = [ipaddress.ip_network(item) for item in chat_env["CHAT_TRUSTED_PROXIES"].split(",")]
    assert trusted == [ipaddress.ip_network(nginx_ip)]


def test_compose_runs_on_a_restricted_engine(services: dict[str, Any], dockerfile: str) -> None:
    """No `# syntax=` frontend (BuildKit fetches it from Docker Hub) and no `ulimits:`
    (a container cannot exceed dockerd's own limit; asking stops it from starting)."""
    assert not re.search(r"^#\s*syntax\s*=", dockerfile, re.M | re.I)
    for name, service in services.items():
        assert "ulimits" not in service, name


def test_docs_name_the_compose_version(compose: dict[str, Any]) -> None:
    """env_file's `required:` needs Compose 2.24; deploy/README.md says so."""
    readme = (ROOT / "deploy" / "README.md").read_text()
    uses_required = any(isinstance(e, dict) and "required" in e
                        for s in compose["services"].values() for e in s.get("env_file", []))
    assert not uses_required or re.search(r"Compose (v2\.24|2\.24)", readme)


def test_rolling_update_script_starts_before_it_stops() -> None:
    """deploy/rolling-update.sh adds a replica, waits for /readyz and the resolver, then
    stops an old one (docker stop: SIGTERM, 1001), one at a time; bash accepts it."""
    script = ROOT / "deploy" / "rolling-update.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
    text = script.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"^READY_PROBE=.*/readyz", code, re.M)
    steps = ("--no-recreate --scale", '"$READY_PROBE"', 'sleep "$RESOLVER_WAIT"', "docker stop",
             "docker rm")
    order = [code.index(step) for step in steps]
    assert order == sorted(order)
    wait = int(re.search(r"RESOLVER_WAIT:-(\d+)", text).group(1))  # type: ignore[union-attr]
    valid = re.search(r"resolver\s[^;]*valid=(\w+)", (ROOT / "deploy" / "nginx.conf").read_text())
    assert valid is not None and wait > seconds(valid.group(1))


def test_tls_override_mounts_what_tls_conf_names(services: dict[str, Any]) -> None:
    """deploy/compose.tls.yml mounts tls.conf where nginx.conf includes it and the
    certificates where tls.conf reads them, and publishes tls.conf's port."""
    override = yaml.safe_load((ROOT / "deploy" / "compose.tls.yml").read_text())["services"]
    tls = (ROOT / "deploy" / "tls.conf").read_text()
    mounts = {v.split(":")[-2] if v.count(":") >= 2 else v.split(":")[1]: v
              for v in override["nginx"]["volumes"]}
    include = render_nginx.COMPOSE_TLS_INCLUDE
    assert any(Path(target).parent == Path(include).parent for target in mounts)
    for cert in re.findall(r"ssl_certificate(?:_key)?\s+(\S+);", tls):
        assert any(cert.startswith(target + "/") for target in mounts), cert
    [listen] = render_nginx.listen_addresses(tls)
    port = listen.split()[0]
    assert any(str(p).endswith(f":{port}") for p in override["nginx"]["ports"])
    assert override["chatserver"]["environment"]["CHAT_COOKIE_SECURE"] == "1"


def test_stop_grace_outlasts_the_drain(services: dict[str, Any], chat_env: dict[str, str]) -> None:
    """Docker waits longer than CHAT_GRACE before SIGKILL, and tini forwards SIGTERM."""
    chat = services["chatserver"]
    grace = float(chat_env.get("CHAT_GRACE", DEFAULT_GRACE))
    assert seconds(chat["stop_grace_period"]) > grace
    assert chat.get("init") is True


def test_image_is_slim_non_root_and_without_build_tools(dockerfile: str) -> None:
    """Slim Python base, a final stage that copies the venv only, and a non-root USER."""
    stages = re.split(r"^FROM\s", dockerfile, flags=re.M)[1:]
    assert len(stages) >= 2, "multi-stage: the build stage's tools stay behind"
    base_args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", dockerfile, re.M))
    final = stages[-1]
    base = final.split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: base_args[m.group(1)], base)
    assert base.startswith("python:") and "slim" in base
    assert not re.search(r"apt-get|apk add|gcc|build-essential|pip install", final)
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "COPY --from=build /opt/venv /opt/venv" in final


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    """The build context is an allowlist: no .env, .venv or .git reaches the builder."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "chatserver", "static"}
    copied = re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$",
                        (ROOT / "Dockerfile").read_text(), re.M)
    for sources in copied:
        for source in sources.split():
            assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"


def test_env_example_lists_every_variable_with_a_comment() -> None:
    """Every documented and every read variable appears in .env.example under a comment."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    listed: dict[str, int] = {}
    for number, line in enumerate(lines):
        match = re.match(r"^#?\s?([A-Z][A-Z0-9_]+)=", line)
        if match:
            listed[match.group(1)] = number
    read_by_server = set(
        re.findall(r"[\"']((?:CHAT|AWS)_[A-Z0-9_]+|PORT|REDIS_URL)[\"']",
                   (ROOT / "chatserver" / "config.py").read_text())
        if (ROOT / "chatserver" / "config.py").exists() else []
    )
    missing = (set(DOCUMENTED_VARIABLES) | read_by_server) - set(listed)
    assert not missing, f".env.example lacks {sorted(missing)}"
    setting = re.compile(r"^#?\s?[A-Z][A-Z0-9_]+=")
    for name, number in listed.items():
        above = number - 1
        while above >= 0 and setting.match(lines[above]):  # a group under one comment
            above -= 1
        assert above >= 0 and lines[above].startswith("# "), f"{name} has no comment"
    active = [line for line in lines if re.match(r"^[A-Z]", line)]
    assert not active, f"copying .env.example must change nothing: {active}"


def test_renderer_changes_only_addresses_and_runtime_paths(tmp_path: Path) -> None:
    """Rendering rewrites listen, resolver, the upstream name, set_real_ip_from, temp paths,
    the TLS include and user; nothing else."""
    template = (ROOT / "deploy" / "nginx.conf").read_text()
    rendered = render_nginx.render(
        template, listen="127.0.0.1:18080", resolver="127.0.0.1:15353",
        upstream="chatserver:19001", real_ip_from=["127.0.0.5", "127.0.0.6"],
        runtime_dir=tmp_path,
    )
    code = "\n".join(line.split("#", 1)[0] for line in rendered.splitlines())
    assert render_nginx.upstream_target(rendered) == "chatserver:19001"
    assert render_nginx.listen_addresses(rendered) == ["127.0.0.1:18080"]
    assert directive(code, "resolver") == [["127.0.0.1:15353", "valid=5s", "ipv6=off"]]
    assert directive(code, "set_real_ip_from") == [["127.0.0.5"], ["127.0.0.6"]]
    assert directive(code, "include") == [[str(tmp_path / "tls.d" / "*.conf")]]
    assert "/var/cache/nginx" not in rendered and not re.search(r"^\s*user\s", rendered, re.M)
    untouched = re.compile(r"^\s*(set \$chatserver|listen|user|resolver |set_real_ip_from"
                           r"|include|\w+_temp_path)\b")
    kept = [line for line in template.splitlines() if not untouched.match(line)]
    assert kept == [line for line in rendered.splitlines() if not untouched.match(line)]


def test_nginx_accepts_the_rendered_config(tmp_path: Path) -> None:
    """`nginx -t` passes on deploy/nginx.conf rendered for local addresses."""
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx)")
    runtime = tmp_path / "nginx"
    (runtime / "tls.d").mkdir(parents=True)
    conf = runtime / "nginx.conf"
    conf.write_text(render_nginx.render(
        (ROOT / "deploy" / "nginx.conf").read_text(), listen="127.0.0.1:18080",
        resolver="127.0.0.1:15353", upstream="chatserver:19001", runtime_dir=runtime,
    ))
    result = subprocess.run(
        [NGINX, "-t", "-p", f"{runtime}/", "-c", str(conf), "-e", str(runtime / "error.log"),
         "-g", f"daemon off; pid {runtime / 'nginx.pid'};"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def seconds(value: str | int | float) -> float:
    """nginx/compose durations (`75s`, `1m30s`, `20s`, 10) in seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u or "s"] for n, u in parts)
