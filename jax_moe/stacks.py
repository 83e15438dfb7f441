"""The tested software stacks, in one place, and what is installed here.

``TESTED_STACKS`` names each GPU stack that has run the GPU test suite, with exact versions, the
pip extras that install it and what it gives. ``pyproject.toml``'s GPU extras pin ranges that
resolve to one of them (``tests/test_install.py`` checks that against the registry) and the README
cites them. ``INTERPRETER_TRITON`` is the triton range the CPU (interpret) backend was run with.

``installed()`` reports the stack installed here and whether it gives FFI launches and TMA; it
reads package versions from their metadata and imports neither jax-triton (0.3.x raises
ImportError on a CPU-only jaxlib) nor triton. ``python -m jax_moe.stacks`` prints it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import sys
import warnings


@dataclasses.dataclass(frozen=True)
class Stack:
    """One tested combination of the packages the GPU backend runs on.

    ``ffi_launches``: launches lower to the XLA FFI custom call ``triton_kernel_call_ffi``, which
    XLA can capture in CUDA graphs; otherwise they go through the legacy custom call.
    ``tma``: kernels can use TMA descriptors (jax-triton hands Triton a global scratch buffer).
    ``extras``: the pip extras of jax-moe that install these versions (on Python >= 3.12).
    ``tested_on``: where the GPU test suite passed with it. The extras of other CUDA versions
    resolve to the same package versions with that CUDA version's plugin.
    """

    name: str
    extras: tuple[str, ...]
    jax: str
    jaxlib: str
    jax_triton: str
    triton: str
    ffi_launches: bool
    tma: bool
    tested_on: str

    def versions(self) -> dict[str, str]:
        """Distribution name -> version, as pip names them."""
        return {"jax": self.jax, "jaxlib": self.jaxlib, "jax-triton": self.jax_triton, "triton": self.triton}


TESTED_STACKS: tuple[Stack, ...] = (
    Stack(
        name="jax-triton-0.4",
        extras=("cuda13", "cuda12"),
        jax="0.11.2",
        jaxlib="0.11.2",
        jax_triton="0.4.1",
        triton="3.7.1",
        ffi_launches=True,
        tma=True,
        tested_on="H200, CUDA 13 (jax-cuda13-plugin 0.11.2), Python 3.12",
    ),
    Stack(
        name="triton-3.6",
        extras=("cuda13-triton36",),
        jax="0.11.2",
        jaxlib="0.11.2",
        jax_triton="0.3.1",
        triton="3.6.0",
        ffi_launches=False,
        tma=False,
        tested_on="H200, CUDA 13 (jax-cuda13-plugin 0.11.2), Python 3.12",
    ),
)

# FFI launches and TMA need all three of these (minimum versions).
FFI_TMA_MINIMUM = {"jax-triton": "0.4", "triton": "3.7", "jaxlib": "0.11.1"}

# triton versions the interpret backend was run with (test_interpret and friends passed), as
# (lowest, first unsupported); pyproject.toml's base ``triton`` requirement is the same range.
# The backend patches private parts of Triton's interpreter, which change between releases.
INTERPRETER_TRITON = ("3.6", "3.10")
INTERPRETER_TRITON_TESTED = ("3.6.0", "3.7.1", "3.8.0", "3.9.0")

# Set to 1 to run the interpret backend on a triton outside INTERPRETER_TRITON anyway.
ALLOW_UNTESTED_TRITON_ENV = "JAX_MOE_ALLOW_UNTESTED_TRITON"


def parse_version(version: str) -> tuple[int, ...]:
    """The release part of a version string as a tuple of ints: "3.7.1+git0abc" -> (3, 7, 1),
    "0.12.0.1" -> (0, 12, 0, 1), "3.10.0rc1" -> (3, 10, 0). Raises ValueError on no digits."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def at_least(version: str | None, minimum: str) -> bool:
    """Whether ``version`` (None: not installed) is ``minimum`` or later (release parts only)."""
    if version is None:
        return False
    a, b = parse_version(version), parse_version(minimum)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, from its metadata; None when it isn't installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclasses.dataclass(frozen=True)
class Installed:
    """The GPU-relevant packages installed here (None: not installed) and what they give."""

    python: str
    jax: str | None
    jaxlib: str | None
    jax_triton: str | None
    triton: str | None
    cuda_plugins: dict[str, str]  # "jax-cuda13-plugin" -> version, for each one installed

    @property
    def ffi_launches(self) -> bool:
        """Launches lower to the XLA FFI custom call (jax-triton >= 0.4, triton >= 3.7, jaxlib >= 0.11.1)."""
        return all(at_least(getattr(self, name.replace("-", "_")), v) for name, v in FFI_TMA_MINIMUM.items())

    @property
    def tma(self) -> bool:
        """Kernels can use TMA descriptors: the same condition as ``ffi_launches``."""
        return self.ffi_launches

    @property
    def tested_stack(self) -> Stack | None:
        """The tested stack whose versions are exactly these, or None."""
        fields = ("jax", "jaxlib", "jax_triton", "triton")
        for stack in TESTED_STACKS:
            if all(getattr(self, field) == getattr(stack, field) for field in fields):
                return stack
        return None

    def describe(self) -> str:
        plugins = ", ".join(f"{name} {v}" for name, v in sorted(self.cuda_plugins.items())) or "no CUDA plugin"
        versions = {"jax": self.jax, "jaxlib": self.jaxlib, "jax-triton": self.jax_triton, "triton": self.triton}
        packages = ", ".join(f"{name} {v or 'not installed'}" for name, v in versions.items())
        lines = [
            f"python {self.python}, {packages}, {plugins}",
            f"FFI launches (CUDA-graph capture): {'yes' if self.ffi_launches else 'no'}; "
            f"TMA: {'yes' if self.tma else 'no'}",
        ]
        stack = self.tested_stack
        if stack is not None:
            lines.append(f"tested stack {stack.name!r} (extras {', '.join(stack.extras)}; {stack.tested_on})")
        elif self.jax_triton is None:
            lines.append("jax-triton is not installed: the triton (GPU) backend is unavailable")
        else:
            tested = "; ".join(_versions_line(s) for s in TESTED_STACKS)
            lines.append(f"not a tested GPU stack (tested: {tested})")
        lines.append(interpreter_triton_problem(self.triton) or f"interpret backend: triton {self.triton} is supported")
        return "\n".join(lines)


def _versions_line(stack: Stack) -> str:
    return " + ".join(f"{name} {v}" for name, v in stack.versions().items() if name != "jaxlib")


def installed() -> Installed:
    """What is installed here, from package metadata; imports neither jax-triton nor triton."""
    plugins = {}
    for cuda in ("12", "13"):
        version = installed_version(f"jax-cuda{cuda}-plugin")
        if version is not None:
            plugins[f"jax-cuda{cuda}-plugin"] = version
    return Installed(
        python=".".join(map(str, sys.version_info[:3])),
        jax=installed_version("jax"),
        jaxlib=installed_version("jaxlib"),
        jax_triton=installed_version("jax-triton"),
        triton=installed_version("triton"),
        cuda_plugins=plugins,
    )


def interpreter_triton_range() -> str:
    low, high = INTERPRETER_TRITON
    return f">={low},<{high}"


def interpreter_triton_problem(version: str | None) -> str | None:
    """Why the interpret backend can't run on this triton version, or None when it can."""
    low, high = INTERPRETER_TRITON
    if version is None:
        return "triton is not installed; the interpret backend needs it"
    if at_least(version, low) and not at_least(version, high):
        return None
    return (
        f"jax_moe's interpret backend supports triton {interpreter_triton_range()} (it patches private parts "
        f"of Triton's interpreter; tested with {', '.join(INTERPRETER_TRITON_TESTED)}), but triton {version} "
        f"is installed. Install a supported version: pip install 'triton{interpreter_triton_range()}' "
        f"(or set {ALLOW_UNTESTED_TRITON_ENV}=1 to try this one anyway)"
    )


class UnsupportedTritonError(RuntimeError):
    """The installed triton is outside the range the interpret backend supports."""


def check_interpreter_triton(version: str | None = None) -> None:
    """Raises UnsupportedTritonError when ``version`` (default: the installed triton) is outside
    ``INTERPRETER_TRITON``; with ``JAX_MOE_ALLOW_UNTESTED_TRITON=1`` it warns instead."""
    if version is None:
        version = installed_version("triton")
        if version is None and "triton" in sys.modules:  # a triton without metadata (source tree)
            version = getattr(sys.modules["triton"], "__version__", None)
    problem = interpreter_triton_problem(version)
    if problem is None:
        return
    if os.environ.get(ALLOW_UNTESTED_TRITON_ENV, "") not in ("", "0") and version is not None:
        warnings.warn(problem, RuntimeWarning, stacklevel=2)
        return
    raise UnsupportedTritonError(problem)


if __name__ == "__main__":
    print(installed().describe())
