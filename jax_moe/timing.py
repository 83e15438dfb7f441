"""Wall-clock timing of jitted JAX functions on the device, shared by the demo and the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax

METHOD = (
    "jit-compiled; {warmup} warm-up calls; then {repeats} repeats of {calls} back-to-back calls "
    "between two device synchronizations, cycling over {sets} input sets; median per call"
)


def median_call_us(
    fn: Callable, input_sets: Sequence[tuple], *, calls: int = 20, repeats: int = 7, warmup: int = 3
) -> float:
    """Median microseconds per call of ``fn(*inputs)``, cycling over ``input_sets``.

    Several input sets keep activations from sitting in L2 between calls; back-to-back calls
    between synchronizations hide the host's dispatch gaps the way a model's forward does.
    """
    for i in range(warmup):
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for i in range(calls):
            out = fn(*input_sets[i % len(input_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def describe(*, calls: int = 20, repeats: int = 7, warmup: int = 3, sets: int = 1) -> str:
    return METHOD.format(calls=calls, repeats=repeats, warmup=warmup, sets=sets)
