"""An order-preserving map over worker processes, shared by the data tools."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

OrderedMap = Callable[[Callable[[Any], Any], Iterable[Any], int], Iterator[Any]]


@contextlib.contextmanager
def ordered_map(num_workers: int) -> Iterator[OrderedMap]:
  """Yields `imap(fn, items, chunksize)`: results in the order of `items`.

  With `num_workers` > 0 the calls run in that many "spawn" worker processes
  (`fn` must be a module-level function); with 0 they run in this process.
  Either way the results, and so everything written from them, are the same.

  Args:
    num_workers: number of worker processes, 0 for none.

  Yields:
    The map function; the processes stop when the block is left.
  """
  if num_workers <= 0:
    yield lambda fn, items, chunksize=1: map(fn, items)
    return
  pool = multiprocessing.get_context("spawn").Pool(num_workers)
  try:
    yield pool.imap
  finally:
    pool.terminate()
    pool.join()
