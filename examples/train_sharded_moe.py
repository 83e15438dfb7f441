"""Train the tiny MoE block of ``train_tiny_moe.py`` data-, expert- and tensor-parallel on 8 devices
and compare its losses with those of one device.

    python examples/train_sharded_moe.py                          # backend "auto"
    python examples/train_sharded_moe.py --backend interpret --steps 3

Eight GPUs if there are, else eight CPU devices (``--xla_force_host_platform_device_count=8``, set
here before JAX starts). The mesh is (data=2, expert=2, tensor=2), of Explicit axes. Flax's logical
axis rules map the layer's names to it: ``expert`` -> the expert axis (each device holds 4 of the 8
experts), ``mlp`` -> the tensor axis (half of each expert's F columns), ``embed`` -> none (a mesh
axis here would store the weights FSDP-style, gathered per call). Each batch is split over the data
and expert axes. ``jax_moe.fused_moe`` reads that layout from the shardings of its arguments: the
expert axis gathers its two devices' tokens, each device computes the pairs of its own experts on
its F columns, and the partial outputs are reduce-scattered back (expert axis) and summed (tensor).
"""

from __future__ import annotations

import argparse
import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import numpy as np

import train_tiny_moe

MESH_SHAPE = (2, 2, 2)
MESH_AXES = ("data", "expert", "tensor")
RULES = (("batch", ("data", "expert")), ("expert", "expert"), ("mlp", "tensor"), ("embed", None))


def sharded_mesh():
    """The (data=2, expert=2, tensor=2) mesh: on the default devices if there are 8, else on 8 CPU devices."""
    devices = jax.devices() if jax.device_count() >= 8 else jax.devices("cpu")
    return jax.make_mesh(MESH_SHAPE, MESH_AXES, devices=devices[:8])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    mesh = sharded_mesh()
    start = time.perf_counter()
    sharded = train_tiny_moe.train(args.backend, args.steps, mesh=mesh, rules=RULES)
    middle = time.perf_counter()
    single = train_tiny_moe.train(args.backend, args.steps)
    end = time.perf_counter()
    difference = np.max(np.abs(np.subtract(sharded, single)) / np.abs(single))
    print(f"backend={args.backend} mesh={dict(mesh.shape)} on {mesh.devices.flat[0].platform} steps={args.steps}")
    print(f"  8 devices: first_loss={sharded[0]:.6f} last_loss={sharded[-1]:.6f} ({middle - start:.1f} s)")
    print(f"  1 device:  first_loss={single[0]:.6f} last_loss={single[-1]:.6f} ({end - middle:.1f} s)")
    print(f"  largest relative difference over the steps: {difference:.1e}")


if __name__ == "__main__":
    main()
