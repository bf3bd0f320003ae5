"""Paths a user types, made absolute once where they enter.

Every path given on a command line, in a config field or to a library entry
point (`load_clip`, `Predictor.from_workdir`, `train_and_evaluate`, ...) may
be relative to the current directory and may start with `~`. It is resolved
here, once, so that what a run records (its config.json, manifests, results)
names the same files from any other working directory, and so that orbax,
which refuses relative paths, never sees one.
"""

from __future__ import annotations

import os

import ml_collections

# Config fields that hold paths (None when unset).
CONFIG_PATHS = ("input.data_dir", "input.vocab", "init.clip_dir")


def absolute(path: str | os.PathLike[str]) -> str:
  """`path` with `~` expanded, made absolute against the current directory
  and normalised ("runs/x/" -> "/home/me/runs/x")."""
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


def absolute_config(
  config: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """A copy of `config` whose CONFIG_PATHS fields that are set are absolute
  (same lock state as `config`)."""
  config = config.copy_and_resolve_references()
  for dotted in CONFIG_PATHS:
    section, field = dotted.split(".")
    value = config[section][field]
    if value:
      config[section][field] = absolute(value)
  return config
