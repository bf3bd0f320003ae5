"""Device mesh, batch sharding and FSDP-style parameter sharding from config.

The mesh has two named axes, ("data", "fsdp"). A global batch is split over
both (every device sees different examples). Parameters are replicated, except
that with an fsdp axis larger than 1 every array of at least `min_size`
elements is sharded along its largest dimension divisible by the fsdp size;
XLA inserts the all-gathers and reduce-scatters. The same rule applies to any
array tree, so optimiser moments follow their parameters.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jmceln_jax.typing import PyTree

AXES = ("data", "fsdp")


def create_mesh(
  mesh_cfg: ml_collections.ConfigDict, devices: list | None = None
) -> Mesh:
  """A ("data", "fsdp") mesh over all devices; one size may be -1.

  Args:
    mesh_cfg: `config.mesh` with integer fields `data` and `fsdp`.
    devices: defaults to `jax.devices()` (all processes).
  """
  devices = jax.devices() if devices is None else devices
  sizes = [int(mesh_cfg[a]) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {dict(mesh_cfg)}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
        f"{len(devices)} devices cannot be split into mesh {dict(mesh_cfg)}."
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"Mesh {dict(zip(AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
      f"but {len(devices)} are available; set --config.mesh.data=-1."
    )
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def array_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """PartitionSpec of one array under the FSDP rule (see module docstring)."""
  if fsdp <= 1 or math.prod(shape) < min_size:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % fsdp == 0:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree: PyTree, mesh: Mesh, min_size: int) -> PyTree:
  """NamedShardings for every leaf of an (abstract) array tree."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
    lambda x: NamedSharding(mesh, array_spec(tuple(x.shape), fsdp, min_size)),
    tree,
  )


def per_process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Examples each process loads per step; checks divisibility clearly."""
  n_dev = mesh.devices.size
  if global_batch_size % n_dev:
    raise ValueError(
      f"Global batch {global_batch_size} is not divisible by the {n_dev} "
      "devices of the mesh; change --config.input.global_batch_size."
    )
  return global_batch_size // jax.process_count()


def host_to_global(batch: PyTree, mesh: Mesh) -> PyTree:
  """Assembles per-process numpy batches into global sharded jax.Arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x), batch
  )
