"""Runs of identical blocks, unrolled or as one scanned block.

Unrolled, block i of a run is a child named str(i), so parameter paths
mirror torch's `nn.Sequential` (`layer3/7/conv2/kernel`). Scanned (`nn.scan`),
blocks start..stop-1 become one child named SCANNED whose parameters (and
batch statistics) carry a leading axis of length stop - start
(`layer3/scanned/conv2/kernel`, [22, 3, 3, 256, 256] in RN101): XLA then
compiles one block instead of stop - start copies, which is most of the
compile time of the paper model's 23-block layer3 and 12-layer text
transformer. The values computed are the same.

Residual blocks whose output is elementwise (normalisation + residual add +
ReLU after the last convolution, as in ResNet's Bottleneck) end in
`materialize`: XLA's CPU backend otherwise fuses these tails of consecutive
blocks into each other and recomputes the whole residual stream in every
block, a cost quadratic in the depth (~11% of the unrolled RN101 image
encoder's forward pass at 416^2). In a scanned run the loop carry already
has a buffer of its own.

`match_layout` converts a variable tree between the two layouts (converted
CLIP weights are always unrolled, as in torch), and `unrolled_loops` makes
every loop of the package trace unrolled, for XLA's cost analysis (it counts
a loop body once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

SCANNED = "scanned"
_UNROLL = [False]


@contextlib.contextmanager
def unrolled_loops() -> Iterator[None]:
  """Programs traced inside unroll every scanned run and per-tap loop
  (ops/conv.py): bigger programs, but XLA's cost analysis then counts
  every iteration."""
  _UNROLL.append(True)
  try:
    yield
  finally:
    _UNROLL.pop()


def unroll() -> bool:
  """Whether loops traced now must be unrolled (see unrolled_loops)."""
  return _UNROLL[-1]


def _own_buffer(x: jax.Array) -> jax.Array:
  """x, rewritten in place at one element: XLA then computes x once into a
  buffer of its own instead of fusing (and duplicating) its computation
  into every consumer."""
  corner = (0,) * x.ndim
  return jax.lax.dynamic_update_slice(
    x, jax.lax.slice(x, corner, (1,) * x.ndim), corner
  )


@jax.custom_vjp
def materialize(x: jax.Array) -> jax.Array:
  """The identity, with x (and, in the backward pass, its cotangent) computed
  once into a buffer of its own on the CPU; a no-op elsewhere.

  XLA's CPU fusion duplicates cheap elementwise producers into all their
  consumers, so a chain of residual blocks recomputes the residual stream's
  whole history in every block. Rewriting one element in place
  (`dynamic_update_slice`) is not elementwise and stops the chain.
  """
  return jax.lax.platform_dependent(x, cpu=_own_buffer, default=lambda y: y)


def _materialize_fwd(x: jax.Array) -> tuple[jax.Array, None]:
  return materialize(x), None


def _materialize_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
  return (materialize(g),)


materialize.defvjp(_materialize_fwd, _materialize_bwd)


def run_blocks(
  block: Callable[..., nn.Module],
  x: jax.Array,
  start: int,
  stop: int,
  scan: bool,
  *args: Any,
  **kwargs: Any,
) -> jax.Array:
  """Applies blocks start..stop-1 in sequence as children of the calling
  module (call inside an `nn.compact` method).

  Args:
    block: module factory taking `name=`, e.g. functools.partial(Block, ...);
      every block maps x to an array of x's shape and dtype.
    x: the input of block `start`.
    start, stop: block indices (names) of the run.
    scan: one scanned child SCANNED for the run (when it has >= 2 blocks)
      instead of children "start".."stop-1".
    *args, **kwargs: passed unchanged to every block (kwargs must be
      static Python values when scanning, e.g. use_running_average).

  Returns:
    The output of block stop-1.
  """
  count = stop - start
  if not scan or count < 2:
    for i in range(start, stop):
      x = block(name=str(i))(x, *args, **kwargs)
    return x

  def body(module: nn.Module, carry: jax.Array, *xs: Any) -> tuple:
    return module(carry, *xs, **kwargs), None

  scanned = nn.scan(
    body,
    variable_axes={"params": 0, "batch_stats": 0},
    split_rngs={"params": True},
    in_axes=(nn.broadcast,) * len(args),
    length=count,
    unroll=count if unroll() else 1,
  )
  x, _ = scanned(block(name=SCANNED), x, *args)
  return x


def _numbered(tree: Mapping[str, Any]) -> list[int]:
  return sorted(int(k) for k in tree if k.isdigit())


def match_layout(tree: Any, target: Any) -> Any:
  """`tree` (a nested dict of arrays) rearranged to the scanned/unrolled
  layout of `target` (same nesting; leaves of any kind): wherever `target`
  has a SCANNED child that `tree` lacks, `tree`'s numbered children beyond
  `target`'s are stacked into it, and the reverse. Anything else is kept as
  it is (a strict merge reports what still differs).
  """
  if not isinstance(tree, Mapping) or not isinstance(target, Mapping):
    return tree
  tree = dict(tree)
  if SCANNED in target and SCANNED not in tree:
    first = len(_numbered(target))
    run = [i for i in _numbered(tree) if i >= first]
    if run:
      if run != list(range(first, first + len(run))):
        raise ValueError(f"Blocks {run} are not consecutive from {first}.")
      blocks = [tree.pop(str(i)) for i in run]
      tree[SCANNED] = jax.tree.map(lambda *a: np.stack(a), *blocks)
  elif SCANNED in tree and SCANNED not in target:
    stacked = tree.pop(SCANNED)
    first = len(_numbered(tree))
    count = len(jax.tree.leaves(stacked)[0])
    for j in range(count):
      tree[str(first + j)] = jax.tree.map(lambda a, j=j: a[j], stacked)
  return {
    k: match_layout(v, target[k]) if k in target else v for k, v in tree.items()
  }
