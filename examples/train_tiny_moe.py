"""Train a tiny MoE transformer block for ~100 steps on synthetic data and watch the loss fall.

    python examples/train_tiny_moe.py                   # backend "auto": triton on a GPU, else reference
    python examples/train_tiny_moe.py --backend interpret --steps 3

``--backend interpret`` runs the Triton kernels through Triton's interpreter on the CPU: a step
takes about 13 s on 2 cores (the reference backend: milliseconds), so give it few steps.

The task: sequences of random tokens in which every token is followed by ``(3 * token + 1) % V``
at even positions, so a model that attends to its input and routes well can drive the loss down.
The block is pre-norm attention, then a pre-norm FusedMoE feed-forward with a load-balancing loss.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_moe import Routing
from flax_layers import FusedMoE

VOCAB, SEQ, BATCH = 64, 32, 16


class TinyMoeBlock(nnx.Module):
    def __init__(self, *, width: int, experts: int, top_k: int, backend: str, dtype, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, width, rngs=rngs)
        self.attn_norm = nnx.RMSNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=4, in_features=width, decode=False, dtype=dtype, rngs=rngs
        )
        self.moe_norm = nnx.RMSNorm(width, rngs=rngs)
        self.moe = FusedMoE(
            width, 2 * width, experts, Routing(top_k), dtype=dtype, backend=backend,
            load_balancing_loss_weight=0.01, rngs=rngs,
        )
        self.out_norm = nnx.RMSNorm(width, rngs=rngs)

    def __call__(self, tokens):
        # On a mesh of Explicit axes the embedding lookup needs its output's sharding spelt out:
        # the tokens' own, plus an unsplit feature dim.
        spec = jax.typeof(tokens).sharding.spec
        x = self.embed(tokens, out_sharding=P(*spec, None) if any(spec) else None)
        mask = nnx.make_causal_mask(tokens)
        x = x + self.attn(self.attn_norm(x), mask=mask).astype(x.dtype)
        x = x + self.moe(self.moe_norm(x)).astype(x.dtype)
        return self.embed.attend(self.out_norm(x))


def batch(key):
    tokens = jax.random.randint(key, (BATCH, SEQ), 0, VOCAB)
    follow = (3 * tokens + 1) % VOCAB
    return jnp.where(jnp.arange(SEQ) % 2 == 1, jnp.roll(follow, 1, axis=1), tokens)


def train(backend: str = "auto", steps: int = 100, seed: int = 0, dtype=jnp.float32, mesh=None, rules=()):
    """Returns the per-step total losses (cross-entropy + auxiliary).

    With ``mesh`` (of Explicit axes) the block is built and trained on it: ``rules`` (Flax logical
    axis rules) map the layer's logical axis names to mesh axes, which shards its parameters as
    they are created, and the rule for ``"batch"`` names the axes each batch is split over. The
    MoE layer runs in the layout those shardings give (``jax_moe.sharding``).
    """
    on_mesh = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with on_mesh, nnx.logical_axis_rules(rules):
        return _train(backend, steps, seed, dtype, mesh, dict(rules).get("batch"))


def _train(backend, steps, seed, dtype, mesh, batch_axes):
    model = TinyMoeBlock(width=64, experts=8, top_k=2, backend=backend, dtype=dtype, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(model):
            logits, aux = nnx.capture(model, nnx.Intermediate)(tokens[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
            # Only odd positions are predictable; the loss counts those.
            return jnp.mean(ce[:, ::2]) + sum(jax.tree.leaves(aux))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    key = jax.random.key(seed)
    for _ in range(steps):
        key, data_key = jax.random.split(key)
        tokens = batch(data_key)
        if mesh is not None:
            tokens = jax.device_put(tokens, NamedSharding(mesh, P(batch_axes)))
        losses.append(float(step(model, optimizer, tokens)))
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    start = time.perf_counter()
    losses = train(args.backend, args.steps, dtype=jnp.dtype(args.dtype))
    print(f"backend={args.backend} device={jax.devices()[0].device_kind} steps={args.steps} "
          f"first_loss={losses[0]:.4f} last_loss={losses[-1]:.4f} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
