"""Streaming, sharded loading: a safetensors checkpoint straight onto a device mesh.

`load_model(spec, mesh=...)` comes here for Hugging Face checkpoint directories. The model is
built abstractly (`nnx.eval_shape`, no weights); each base leaf gets its `fsdp_shardings`
placement, and every device's block of it is read from the files and put on that device before
the next block is read:

* a block is read with `SafetensorsTensors.read`, a ``get_slice`` of a freshly opened
  (memory-mapped) file that is closed after the read, so only the block's own pages are ever
  mapped, and only while they are copied;
* a stacked leaf [L, ...] is assembled per device from the per-layer tensors (layer i of the
  block from ``model.layers.{i}.*``), transposed from transformers' [out, in] on the way: the
  slice read from the file is the transposed index of the block;
* devices that hold the same block (replicas over ``data``, replicated leaves) share one read;
* the blocks are put on their devices one at a time and joined with
  `jax.make_array_from_single_device_arrays` (`jax.make_array_from_callback` would first read
  every device's block into host memory, then place them all);
* with several processes each reads the blocks of its own devices only.

So host memory beyond the placed weights is one block plus its mapped pages. Checks run before
any weight is read: tensor names (`convert.check_tensor_names`, strict) and every tensor's
shape from the file headers. Tied embeddings, biases and Gemma's layouts come from the same
`convert.hf_layout` table as the whole-model path, and the result equals it exactly (same
casts). GGUF files are not streamed: dequantization needs the whole tensor, so
`loading.load_model` loads them whole and then places them on the mesh.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from g2is_jax import sharding as shd
from g2is_jax.errors import G2ISError
from g2is_jax.models.config import LoraConfig, ModelConfig
from g2is_jax.models.convert import Leaf, check_tensor_names, hf_layout, hf_shapes
from g2is_jax.models.llama import BASE_FILTER, Llama, init_lora_state

log = logging.getLogger(__name__)

__all__ = ["load_sharded"]


def _bounds(index: tuple[slice, ...], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(start, stop) of each axis of a device's index (a tuple of slices, step 1)."""
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _block(reader, leaf: Leaf, bounds: tuple[tuple[int, int], ...], dtype) -> np.ndarray:
    """One device's block of `leaf` (bounds over our layout), read from the files and cast."""
    out = np.empty([b - a for a, b in bounds], dtype)
    inner = bounds[1:] if leaf.stacked else bounds
    # transformers stores [out, in]: our block [a:b, c:d] is rows c:d, columns a:b there.
    hf = inner[::-1] if leaf.transpose else inner
    index = tuple(slice(a, b) for a, b in hf)
    if not leaf.stacked:
        part = reader.read(leaf.names[0], index)
        out[...] = part.T if leaf.transpose else part
        return out
    first, last = bounds[0]
    for i in range(first, last):
        part = reader.read(leaf.names[i], index)
        out[i - first] = part.T if leaf.transpose else part
    return out


def _place_leaf(reader, leaf: Leaf, shape: tuple[int, ...], dtype,
                where: NamedSharding) -> jax.Array:
    """`leaf` as a global array with sharding `where`, built block by block."""
    by_block: dict[tuple, list] = {}
    for device, index in where.addressable_devices_indices_map(shape).items():
        by_block.setdefault(_bounds(index, shape), []).append(device)
    placed = {}
    for bounds, devices in by_block.items():
        host = _block(reader, leaf, bounds, dtype)
        for device in devices:
            placed[device] = jax.device_put(host, device)
        del host  # the next block is read only after this one is on its devices
    arrays = [placed[d] for d in where.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, where, arrays)


def _check_shapes(reader, cfg: ModelConfig, source: str) -> None:
    """G2ISError naming the first tensor whose stored shape is not the config's."""
    for name, want in hf_shapes(cfg).items():
        got = tuple(reader.shape(name))
        if got != want:
            raise G2ISError(f"tensor {name!r} in {source} has shape {got}, the config expects "
                            f"{want}")


def _abstract(cfg: ModelConfig, lora: LoraConfig | None, dtype: str) -> Llama:
    return nnx.eval_shape(lambda: Llama(cfg, lora, dtype=dtype, rngs=nnx.Rngs(0)))


def load_sharded(cfg: ModelConfig, reader, mesh: Mesh, *, lora: LoraConfig | None = None,
                 dtype: str = "float32", seed: int = 0, source: str = "") -> Llama:
    """A `Llama` whose base weights are read from `reader` (`loading.SafetensorsTensors`)
    straight into their `fsdp_shardings` on `mesh`, one device block at a time; adapters (with
    `lora`) fresh from `seed` as `build_model` makes them, replicated. See the module docstring.
    """
    check_tensor_names(cfg, reader, source=source)
    _check_shapes(reader, cfg, source)
    graphdef, base_abs, lora_abs = nnx.split(_abstract(cfg, lora, dtype), BASE_FILTER,
                                             nnx.LoRAParam)
    shardings = shd.fsdp_shardings(base_abs, mesh)
    flat_abs = dict(nnx.to_flat_state(base_abs))
    flat_shd = dict(nnx.to_flat_state(shardings))
    leaves = {}
    for leaf in hf_layout(cfg):
        var = flat_abs[leaf.path]
        shape, dtype_np = tuple(var.shape), np.dtype(var.dtype)
        where = flat_shd[leaf.path].get_value()
        leaves[leaf.path] = var.replace(_place_leaf(reader, leaf, shape, dtype_np, where))
    missing = sorted(set(flat_abs) - set(leaves))
    if missing:  # hf_layout covers every base leaf; a new leaf type must be added there
        raise AssertionError(f"no checkpoint tensors for model leaves {missing}")
    base = nnx.from_flat_state([(path, leaves[path]) for path in flat_abs])
    adapters = shd.place(init_lora_state(lora_abs, seed), shd.replicated(mesh))
    return nnx.merge(graphdef, base, adapters)
