"""Wall-clock timing of jitted JAX functions on the device, shared by the demo and the benchmarks."""

from __future__ import annotations

import concurrent.futures
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp

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


def compile_all(
    programs: Mapping[Hashable, tuple[Callable, tuple]], threads: int, seconds: dict | None = None
) -> dict:
    """``{key: (fn, args)}`` -> ``{key: jit(fn) compiled for args, or the exception that stopped it}``.

    Programs are lowered and compiled ``threads`` at a time: Triton's compiles (which jax-triton
    runs while lowering) and XLA's release the GIL for most of their work. Two things can fail in
    company that succeed alone: XLA autotunes GEMMs on the GPU while compiling, and concurrent
    autotuning can run out of GPU memory; and CPython 3.11's ``ast`` module (Triton parses each
    kernel's source) is not thread-safe. A program that fails in the pool is therefore retried
    alone, and only that error is kept. Everything is compiled before this returns, so that no
    compile competes with a timed call for the host. Keys whose programs are the same function on
    arguments of the same structure, shapes and dtypes share one compile. ``seconds``, if given,
    gets each compiled program's lowering and compile time (in the pool, where it shares the host
    with the others).
    """
    seconds = {} if seconds is None else seconds
    compiled_as = {key: _signature(*program) for key, program in programs.items()}
    unique = {signature: key for key, signature in reversed(compiled_as.items())}  # the first key of each

    def build(key, fn, args):
        start = time.perf_counter()
        try:
            return jax.jit(fn).lower(*args).compile()
        finally:
            seconds[key] = time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        futures = {key: pool.submit(build, key, *programs[key]) for key in programs if unique[compiled_as[key]] == key}
        concurrent.futures.wait(futures.values())
    results = {}
    for key, future in futures.items():
        if future.exception() is None:
            results[key] = future.result()
            continue
        try:
            results[key] = build(key, *programs[key])
        except Exception as e:  # e.g. a route that can't take this shape, tiles too big for the chip
            results[key] = e
    return {key: results[unique[signature]] for key, signature in compiled_as.items()}


def _signature(fn: Callable, args: tuple) -> Hashable:
    leaves, structure = jax.tree.flatten(args)
    return fn, structure, tuple((tuple(leaf.shape), jnp.dtype(leaf.dtype)) for leaf in leaves)


def train_step(loss: Callable) -> Callable:
    """``loss(x, logits, w_gate, w_up, w_down, cotangent, *rest)``'s value and gradients with respect
    to its first five arguments (``rest``, e.g. a family's extra arrays, gets none), jitted, each
    weight gradient reduced to the sum of a few of its elements.

    ``value_and_grad``, not ``grad``: without the value XLA drops the forward's GEMMs (the
    backward recomputes what it needs), and a step would time the backward alone. The layer still
    computes every gradient in full (a kernel's output can't be computed in part); the tiny slice
    sums keep them from piling up over back-to-back calls (2 x 21 GB of weight gradients for
    DeepSeek-V3) without adding passes over them to the timed step.
    """

    def step(x, logits, w_gate, w_up, w_down, cotangent, *rest):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(
            x, logits, w_gate, w_up, w_down, cotangent, *rest
        )
        weight_grad_sums = jnp.stack([jnp.sum(g[..., :8].astype(jnp.float32)) for g in grads[2:]])
        return value, grads[0], grads[1], weight_grad_sums

    return jax.jit(step)


def describe(*, calls: int | str = 20, repeats: int = 7, warmup: int = 3, sets: int = 1) -> str:
    return METHOD.format(calls=calls, repeats=repeats, warmup=warmup, sets=sets)
