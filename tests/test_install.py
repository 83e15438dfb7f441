"""Install metadata against jax_moe.stacks: the GPU extras resolve to tested stacks (pip's resolver
on the registry, marked ``network``), ``stacks.installed`` reports what is installed, and the
interpret backend refuses a triton outside the range it was tested with."""

import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest

from jax_moe import stacks

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
BASE = PROJECT["dependencies"]
EXTRAS = PROJECT["optional-dependencies"]
GPU_EXTRAS = sorted(extra for extra in EXTRAS if extra.startswith("cuda"))

# A glibc 2.28 x86-64 Linux machine: every manylinux tag up to 2.28 (pip doesn't widen --platform).
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{minor}_x86_64" for minor in range(5, 29)
]
NETWORK_ERRORS = (
    "NewConnectionError",
    "ConnectTimeoutError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No route to host",
    "ReadTimeoutError",
)


def _resolve(requirements: list[str], python_version: str, workdir: pathlib.Path):
    """pip's resolver, dry run, for a fresh Linux x86-64 machine with ``python_version``: the
    subprocess result and {distribution: version} (None where pip found no solution)."""
    workdir.mkdir(parents=True)
    report = workdir / "report.json"
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
        "--report", str(report), "--target", str(workdir / "target"),
        "--python-version", python_version, "--only-binary=:all:",
        *(f"--platform={platform}" for platform in PLATFORMS),
        *requirements,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    if result.returncode != 0 and any(e in result.stderr for e in NETWORK_ERRORS):
        pytest.skip(f"the package registry can't be reached: {result.stderr[-500:]}")
    if result.returncode != 0:
        return result, None
    installs = json.loads(report.read_text())["install"]
    versions = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in installs}
    return result, versions


def _without_cuda_wheels(requirements: list[str]) -> list[str]:
    """``jax[cudaNN]`` as ``jax[cudaNN-local]``: the same jaxlib and plugin pins, without the
    plugin's NVIDIA library wheels (lower bounds only, ~2.5 GB that pip would download here to
    read their metadata where the index serves none)."""
    return [re.sub(r"^jax\[(cuda\d+)\]", r"jax[\1-local]", r) for r in requirements]


# (name, Python version, requirements): the GPU extras on 3.12, on 3.11, and the CPU install on
# 3.11. The extra's requirements come first: pip then reads the versions they allow first.
CASES = [(extra, "3.12", _without_cuda_wheels(EXTRAS[extra] + BASE)) for extra in GPU_EXTRAS]
CASES += [(f"{extra}@3.11", "3.11", _without_cuda_wheels(EXTRAS[extra] + BASE)) for extra in GPU_EXTRAS]
CASES += [("test@3.11", "3.11", EXTRAS["test"] + BASE)]


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    """Every case resolved once, in parallel (each is a few seconds of waiting on the registry)."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip is not installed in this environment")
    root = tmp_path_factory.mktemp("resolve")
    with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
        futures = {
            name: pool.submit(_resolve, requirements, python, root / name.replace("@", "-py"))
            for name, python, requirements in CASES
        }
        return {name: future.result() for name, future in futures.items()}


def _stack_of(extra: str) -> stacks.Stack:
    (stack,) = [s for s in stacks.TESTED_STACKS if extra in s.extras]
    return stack


def test_every_gpu_extra_has_one_tested_stack():
    named = sorted(extra for stack in stacks.TESTED_STACKS for extra in stack.extras)
    assert named == GPU_EXTRAS, "pyproject.toml's cuda* extras and jax_moe/stacks.py's TESTED_STACKS disagree"


def test_base_triton_requirement_is_the_interpreters_range():
    assert f"triton{stacks.interpreter_triton_range()}" in BASE


@pytest.mark.network
@pytest.mark.parametrize("extra", GPU_EXTRAS)
def test_gpu_extra_resolves_to_a_tested_stack(resolved, extra):
    result, versions = resolved[extra]
    assert versions is not None, f"pip can't resolve jax-moe[{extra}] on Python 3.12:\n{result.stderr[-3000:]}"
    stack = _stack_of(extra)
    cuda = extra.split("-")[0].removeprefix("cuda")
    expected = stack.versions() | {f"jax-cuda{cuda}-plugin": stack.jaxlib, f"jax-cuda{cuda}-pjrt": stack.jaxlib}
    got = {name: versions.get(name) for name in expected}
    assert got == expected, (
        f"pip install 'jax-moe[{extra}]' on Python 3.12 now resolves to {got}, not the tested stack "
        f"{stack.name!r} ({expected}). Run the GPU tests with these versions and add them to "
        f"jax_moe/stacks.py, or pin pyproject.toml's {extra!r} extra to the tested versions."
    )


@pytest.mark.network
@pytest.mark.parametrize("extra", GPU_EXTRAS)
def test_gpu_extra_is_refused_on_python_3_11(resolved, extra):
    """No GPU stack is tested on Python 3.11 (jax >= 0.11 needs 3.12): pip must refuse rather
    than fall back to an untested jax 0.10 stack."""
    result, versions = resolved[f"{extra}@3.11"]
    assert versions is None, f"jax-moe[{extra}] resolves on Python 3.11, to an untested stack: {versions}"
    assert "ResolutionImpossible" in result.stderr or "No matching distribution" in result.stderr, result.stderr


@pytest.mark.network
def test_cpu_install_resolves_on_python_3_11_to_a_supported_triton(resolved):
    result, versions = resolved["test@3.11"]
    assert versions is not None, f"pip can't resolve jax-moe[test] on Python 3.11:\n{result.stderr[-3000:]}"
    assert stacks.interpreter_triton_problem(versions["triton"]) is None
    assert "jax-triton" not in versions


# --------------------------------------------------------------------------------------------
# stacks.installed()
# --------------------------------------------------------------------------------------------


def _fake_installed(monkeypatch, **versions):
    versions = {name.replace("_", "-"): v for name, v in versions.items()}
    monkeypatch.setattr(stacks, "installed_version", lambda distribution: versions.get(distribution))
    return stacks.installed()


@pytest.mark.parametrize("stack", stacks.TESTED_STACKS, ids=lambda s: s.name)
def test_installed_recognises_each_tested_stack(monkeypatch, stack):
    found = _fake_installed(monkeypatch, **stack.versions(), jax_cuda13_plugin=stack.jaxlib)
    assert found.tested_stack == stack
    assert (found.ffi_launches, found.tma) == (stack.ffi_launches, stack.tma)
    assert found.cuda_plugins == {"jax-cuda13-plugin": stack.jaxlib}
    assert f"tested stack {stack.name!r}" in found.describe()


@pytest.mark.parametrize(
    "versions,ffi",
    [
        (dict(jax="0.12.0.1", jaxlib="0.12.0.1", jax_triton="0.4.1", triton="3.9.0"), True),
        (dict(jax="0.11.1", jaxlib="0.11.1", jax_triton="0.4.0", triton="3.7.0"), True),
        (dict(jax="0.11.0", jaxlib="0.11.0", jax_triton="0.4.1", triton="3.7.1"), False),  # jaxlib < 0.11.1
        (dict(jax="0.11.2", jaxlib="0.11.2", jax_triton="0.3.1", triton="3.7.1"), False),  # jax-triton 0.3
        (dict(jax="0.11.2", jaxlib="0.11.2", jax_triton="0.4.1", triton="3.6.0"), False),  # triton 3.6
        (dict(jax="0.10.2", jaxlib="0.10.2", jax_triton=None, triton="3.9.0"), False),  # CPU install
        (dict(jax="0.11.2", jaxlib="0.11.2", jax_triton="0.4.1", triton="3.7.1+git0abc"), True),
    ],
)
def test_installed_ffi_and_tma_need_new_enough_jax_triton_triton_and_jaxlib(monkeypatch, versions, ffi):
    found = _fake_installed(monkeypatch, **versions)
    assert found.ffi_launches is ffi and found.tma is ffi
    assert found.tested_stack is None
    text = found.describe()
    assert f"FFI launches (CUDA-graph capture): {'yes' if ffi else 'no'}" in text
    if versions["jax_triton"] is None:
        assert "jax-triton is not installed" in text
    else:
        assert "not a tested GPU stack" in text and "jax-triton 0.4.1 + triton 3.7.1" in text


def test_installed_reads_metadata_without_importing_jax_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax_triton", None)  # any import of it now raises ImportError
    found = stacks.installed()
    assert found.triton is not None and found.jax is not None
    assert found.describe()


def test_version_comparison():
    assert stacks.parse_version("0.12.0.1") == (0, 12, 0, 1)
    assert stacks.parse_version("3.7.1+git0abc") == (3, 7, 1)
    assert stacks.at_least("0.11.1", "0.11.1") and stacks.at_least("0.11.10", "0.11.2")
    assert stacks.at_least("0.4", "0.4.0") and not stacks.at_least("0.3.9", "0.4")
    assert not stacks.at_least(None, "0.1")
    with pytest.raises(ValueError):
        stacks.parse_version("unknown")


# --------------------------------------------------------------------------------------------
# The interpret backend's triton range
# --------------------------------------------------------------------------------------------


def test_installed_triton_is_one_the_interpret_backend_supports():
    assert stacks.interpreter_triton_problem(stacks.installed_version("triton")) is None


@pytest.mark.parametrize("version", ["3.6.0", "3.7.1", "3.8.0", "3.9.0", "3.9.1+git0abc"])
def test_interpreter_accepts_the_tested_range(version):
    stacks.check_interpreter_triton(version)


@pytest.mark.parametrize("version", ["3.5.1", "3.10.0", "3.10.0rc1", "4.0.0"])
def test_interpreter_refuses_other_tritons_naming_version_and_range(monkeypatch, version):
    monkeypatch.delenv(stacks.ALLOW_UNTESTED_TRITON_ENV, raising=False)
    with pytest.raises(stacks.UnsupportedTritonError, match=rf"triton {version} is installed") as info:
        stacks.check_interpreter_triton(version)
    assert f"supports triton {stacks.interpreter_triton_range()}" in str(info.value)
    monkeypatch.setenv(stacks.ALLOW_UNTESTED_TRITON_ENV, "1")
    with pytest.warns(RuntimeWarning, match=rf"triton {version} is installed"):
        stacks.check_interpreter_triton(version)


def test_unsupported_triton_fails_at_first_use_of_the_interpret_backend_not_at_import(tmp_path):
    """A triton that reports 3.10.0 (its metadata shadowed): ``import jax_moe`` and the reference
    backend work, the interpret backend raises the error naming the version and the range."""
    fake = tmp_path / "triton-3.10.0.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: triton\nVersion: 3.10.0\n")
    script = textwrap.dedent(
        """
        import jax.numpy as jnp
        import jax_moe
        from jax_moe import stacks

        assert stacks.installed_version("triton") == "3.10.0"
        args = (jnp.ones((2, 8)), jnp.ones((2, 4)), jnp.ones((4, 8, 16)), jnp.ones((4, 8, 16)), jnp.ones((4, 16, 8)))
        jax_moe.fused_moe(*args, top_k=1, backend="reference")
        try:
            jax_moe.fused_moe(*args, top_k=1, backend="interpret")
        except stacks.UnsupportedTritonError as e:
            print("refused:", e)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), JAX_PLATFORMS="cpu")
    env.pop(stacks.ALLOW_UNTESTED_TRITON_ENV, None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: " in result.stdout
    assert "triton 3.10.0 is installed" in result.stdout
    assert f"supports triton {stacks.interpreter_triton_range()}" in result.stdout
