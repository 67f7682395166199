"""The Dockerfiles and the Compose stack: they parse, reference files that exist, and agree
with aicc's settings and with each other. No Docker daemon needed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from aicc.cli.main import main as cli
from aicc.config import Settings
from tests.conftest import LiveServer
from tests.deploy.conftest import SettingsFor
from tests.deploy.dockerfile import (
    Dockerfile,
    DockerfileError,
    Instruction,
    context_keeps,
    expand,
    parse,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
_DURATION = re.compile(r"^(?:(\d+)m)?(?:(\d+)s)?$")


@cache
def _dockerfile(path: Path) -> Dockerfile:
    return parse(path)


@cache
def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _image_settings(settings_for: SettingsFor, path: Path) -> Settings:
    return settings_for(_dockerfile(path).final.env())


def _seconds(duration: str) -> int:
    match = _DURATION.match(duration)
    assert duration, "empty duration"
    assert match is not None, f"not a duration: {duration!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def _healthcheck_command(dockerfile: Dockerfile) -> list[str]:
    healthcheck = dockerfile.final.last("HEALTHCHECK")
    assert healthcheck is not None
    words = healthcheck.words
    assert words[0] == "CMD", "HEALTHCHECK CMD [...]"
    command = json.loads(healthcheck.arguments.split("CMD", 1)[1])
    assert isinstance(command, list)
    return [str(word) for word in command]


# -- the reader itself -------------------------------------------------------------------------


def test_reader_splits_stages_and_continued_lines(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(
        "# syntax=docker/dockerfile:1\nARG V=3.11\nFROM python:${V}-slim AS build\n"
        "RUN echo a \\\n    # a comment inside\n    && echo b\n"
        "FROM python:${V}-slim\nENV A=1 B=$A/x\nCOPY --from=build /w /w\n"
    )
    dockerfile = parse(path)
    assert [stage.name for stage in dockerfile.stages] == ["build", None]
    assert dockerfile.base_image(dockerfile.final) == "python:3.11-slim"
    (run,) = dockerfile.stage("build").all("RUN")
    assert run.arguments == "echo a  && echo b"
    assert dockerfile.final.env() == {"A": "1", "B": "1/x"}
    (copy,) = dockerfile.final.all("COPY")
    assert copy.flags == {"from": "build"}
    assert copy.words == ["/w", "/w"]


@pytest.mark.parametrize(
    "text",
    ["FROM a\nRUNN x\n", "RUN x\nFROM a\n", "FROM a\nRUN x \\\n", "FROM a b c d\n"],
)
def test_reader_rejects_malformed_dockerfiles(tmp_path: Path, text: str) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    with pytest.raises(DockerfileError):
        parse(path)


# -- the Dockerfiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_in_stages_from_pinned_images(path: Path) -> None:
    dockerfile = _dockerfile(path)
    names = [stage.name for stage in dockerfile.stages]
    assert names == ["build", "runtime"]
    for stage in dockerfile.stages:
        image = dockerfile.base_image(stage)
        assert "$" not in image, image
        assert ":" in image, image
        assert not image.endswith(":latest"), image
    assert "-devel-" not in dockerfile.base_image(dockerfile.final)
    # The compiler stays in the build stage.
    final_runs = " ".join(i.arguments for i in dockerfile.final.all("RUN"))
    assert "build-essential" not in final_runs
    assert "build-essential" in " ".join(i.arguments for i in dockerfile.stage("build").all("RUN"))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_reach_the_builder(path: Path) -> None:
    dockerfile = _dockerfile(path)
    ignore_file = path.with_name(path.name + ".dockerignore")
    assert ignore_file.is_file(), "a per-Dockerfile ignore file keeps .venv out of the context"
    seen_stages: set[str] = set()
    num_context_sources = 0
    for stage in dockerfile.stages:
        for instruction in stage.instructions:
            if instruction.keyword in {"COPY", "ADD"}:
                *sources, _target = instruction.words
                if "from" in instruction.flags:
                    assert instruction.flags["from"] in seen_stages, instruction
                    continue
                for source in sources:
                    assert context_keeps(ROOT, ignore_file, source), f"{path.name}: {source}"
                    num_context_sources += 1
            if instruction.keyword == "RUN" and "mount" in instruction.flags:
                mount = dict(p.split("=", 1) for p in instruction.flags["mount"].split(","))
                assert mount.get("from") in seen_stages, instruction
        if stage.name:
            seen_stages.add(stage.name)
    assert num_context_sources >= 3  # pyproject.toml, README.md, src


def test_ignore_file_keeps_the_venv_out(tmp_path: Path) -> None:
    ignore_file = DEPLOY / "Dockerfile.dockerignore"
    assert not context_keeps(ROOT, ignore_file, ".venv")
    assert not context_keeps(ROOT, ignore_file, "tests")
    assert context_keeps(ROOT, ignore_file, "src")
    assert not context_keeps(ROOT, ignore_file, "src/no-such-file")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_a_user_it_creates(path: Path) -> None:
    final = _dockerfile(path).final
    user = final.last("USER")
    assert user is not None
    assert user.arguments not in {"root", "0"}
    assert not user.arguments.startswith("0:")
    created = " ".join(i.arguments for i in final.all("RUN"))
    assert re.search(rf"useradd\b[^&]*\b{re.escape(user.arguments)}\b", created), created


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_exposed_ports_and_volumes_are_the_settings_the_image_gets(
    path: Path, settings_for: SettingsFor
) -> None:
    final = _dockerfile(path).final
    settings = _image_settings(settings_for, path)
    exposed = {int(port) for i in final.all("EXPOSE") for port in i.arguments.split()}
    assert settings.port == Settings.model_fields["port"].default
    assert exposed == {settings.port, settings.metrics_port}
    assert (settings.host, settings.metrics_host) == ("0.0.0.0", "0.0.0.0")
    volume = final.last("VOLUME")
    assert volume is not None
    assert set(volume.words) == {str(settings.model_dir), str(settings.state_dir)}
    # Created (and owned by the user) before VOLUME, so a fresh volume is writable.
    created = " ".join(i.arguments for i in final.all("RUN"))
    assert f"mkdir -p {' '.join(volume.words)}" in created
    assert f"chown aicc:aicc {' '.join(volume.words)}" in created


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_starts_the_server_and_stops_on_sigterm(path: Path) -> None:
    final = _dockerfile(path).final
    entrypoint, command, stopsignal = (final.last(k) for k in ("ENTRYPOINT", "CMD", "STOPSIGNAL"))
    assert entrypoint is not None
    assert command is not None
    assert stopsignal is not None
    assert entrypoint.words == ["aicc"]  # exec form: aicc is PID 1 and receives SIGTERM
    assert command.arguments.startswith("[")
    assert command.words[0] in cli.commands
    assert stopsignal.arguments == "SIGTERM"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_asks_readyz_on_the_api_port(path: Path) -> None:
    command = _healthcheck_command(_dockerfile(path))
    assert command[:2] == ["python", "-c"]
    assert "/readyz" in command[2]
    assert "AICC_PORT" in command[2]


def test_healthcheck_command_passes_on_a_ready_server_and_fails_without_one(
    server: LiveServer,
) -> None:
    python_code = _healthcheck_command(_dockerfile(DEPLOY / "Dockerfile"))[2]
    port = server.base_url.rsplit(":", 1)[1]

    def check(port: str) -> int:
        env = {"AICC_PORT": port, "PATH": "/usr/bin:/bin"}
        run = subprocess.run([sys.executable, "-c", python_code], env=env, timeout=30)
        return run.returncode

    assert check(port) == 0
    assert check("1") != 0  # nothing listens on port 1


def test_cuda_image_builds_llama_cpp_with_cuda_and_vllm_only_on_request() -> None:
    dockerfile = _dockerfile(DEPLOY / "Dockerfile.cuda")
    build, final = dockerfile.stage("build"), dockerfile.final
    assert dockerfile.base_image(build).startswith("nvidia/cuda:")
    assert "-devel-" in dockerfile.base_image(build)
    assert "-runtime-" in dockerfile.base_image(final)
    assert "-DGGML_CUDA=ON" in " ".join(i.arguments for i in build.all("RUN"))
    assert final.args(dockerfile.global_args)["VLLM_VERSION"] == ""
    vllm_run = next(i for i in final.all("RUN") if "vllm" in i.arguments)
    assert 'if [ -n "${VLLM_VERSION}" ]' in vllm_run.arguments
    assert final.env()["AICC_DEVICE"] == "cuda"


# -- docker-compose.yml ------------------------------------------------------------------------


def test_compose_runs_the_stack_with_optional_profiles() -> None:
    services = _compose()["services"]
    assert {"aicc", "prometheus", "grafana"} <= services.keys()
    for name in ("aicc", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start with a plain `up -d`"
    assert services["postgres"]["profiles"] == ["postgres"]
    assert services["ldap"]["profiles"] == ["ldap"]
    # aicc waits for an optional service only when its profile is on.
    for name, dependency in services["aicc"]["depends_on"].items():
        assert dependency["required"] is False, name
    for name, service in services.items():
        image = service["image"]
        assert ":" in image, f"{name}: pin {image}"
        assert not image.endswith(":latest"), f"{name}: pin {image}"


def test_compose_references_files_that_exist() -> None:
    compose = _compose()
    named_volumes = set(compose["volumes"])
    for name, service in compose["services"].items():
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context == ROOT
            assert (context / service["build"]["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in named_volumes, f"{name}: undeclared volume {source}"


def test_compose_aicc_serves_the_image_ports_and_keeps_metrics_private(
    settings_for: SettingsFor,
) -> None:
    aicc = _compose()["services"]["aicc"]
    settings = _image_settings(settings_for, DEPLOY / "Dockerfile")
    published = [mapping.rsplit(":", 1) for mapping in aicc["ports"]]
    assert [int(container) for _, container in published] == [settings.port]
    assert all(host.startswith("127.0.0.1:") for host, _ in published)
    # Only names pass through (unset stays unset: an empty AICC_ADMIN_KEY would be a key).
    assert all("=" not in variable for variable in aicc["environment"])
    assert _seconds(aicc["stop_grace_period"]) > settings.drain_timeout_s
    assert aicc["init"] is True  # tini: SIGTERM to aicc only, not its worker processes


def test_prometheus_scrapes_the_aicc_metrics_port(settings_for: SettingsFor) -> None:
    compose = _compose()
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (targets,) = [group["targets"] for group in job["static_configs"]]
    (target,) = targets
    host, port = target.rsplit(":", 1)
    assert host in compose["services"]
    settings = _image_settings(settings_for, DEPLOY / "Dockerfile")
    assert int(port) == settings.metrics_port
    prometheus = compose["services"]["prometheus"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    assert (DEPLOY / mounted[config_path]).resolve() == PROMETHEUS


def test_grafana_is_provisioned_from_deploy_grafana() -> None:
    compose = _compose()
    grafana = compose["services"]["grafana"]
    mounted = {v.split(":")[1]: (DEPLOY / v.split(":")[0]).resolve() for v in grafana["volumes"]}
    assert mounted["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/aicc.yml").read_text())
    dashboards_path = providers["providers"][0]["options"]["path"]
    assert mounted[dashboards_path] == DEPLOY / "grafana" / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_path + "/")
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file()
    # The provisioned datasource reaches this Prometheus, at its scrape interval.
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    scrape = yaml.safe_load(PROMETHEUS.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape


def test_compose_variables_have_defaults() -> None:
    # `${X:?}` would fail every `up`, whatever the profile; plain `${X}` warns when unset.
    for match in re.finditer(r"\$\{([^}]*)\}", COMPOSE.read_text()):
        assert ":-" in match.group(1), match.group(0)
    assert expand("${A:-x}", {}) == "x"


def _promtool_check(path: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool: scripts/install-test-deps.sh installs it"
    return subprocess.run(
        [promtool, "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_prometheus_config_passes_promtool() -> None:
    result = _promtool_check(PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "prometheus.yml"
    broken.write_text("scrape_configs:\n  - job_name: aicc\n    scrape_interval: soon\n")
    assert _promtool_check(broken).returncode != 0


def test_instruction_words_handle_flags() -> None:
    instruction = Instruction("HEALTHCHECK", '--interval=5s CMD ["a"]', 1)
    assert instruction.flags == {"interval": "5s"}
    assert instruction.words[0] == "CMD"
