"""Options shared by the commands that scale out (`g2is grads`, `g2is select`): the device mesh
and the multi-process start. Not a subcommand."""

from __future__ import annotations

import argparse
from typing import Any


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser, *, fsdp: bool) -> None:
    g = p.add_argument_group(
        "scaling out",
        "a device mesh, and several processes through jax.distributed (each process runs the "
        "same command with its own --process-id; only process 0 writes shared files)",
    )
    axes = "data=4,fsdp=2: examples over 'data' and base weights over 'fsdp'" if fsdp else \
        "data=8: T's rows over every device"
    g.add_argument("--mesh", metavar="SPEC", help=f"device mesh, e.g. {axes}; the sizes must "
                   "multiply to the device count of all processes (default: every device on "
                   "'data')")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same "
                   "for every process, or 'auto' (TPU pods, SLURM, Open MPI); default: "
                   "$JAX_COORDINATOR_ADDRESS, else one process")
    g.add_argument("--num-processes", type=_integer, metavar="N",
                   help="processes in the run (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=_integer, metavar="I",
                   help="this process, 0..N-1 (default: $JAX_PROCESS_ID)")


def setup(args: argparse.Namespace) -> Any:
    """Join the multi-process run (before any JAX work), then build the `jax.sharding.Mesh`."""
    from g2is_jax import sharding

    spec = sharding.parse_mesh(args.mesh)  # a bad spec fails before any process waits on us
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    return sharding.make_mesh(spec)
