"""Smoke tests of the benchmark scripts: each runs its --tiny mode in-process
and the JSON it writes must hold positive measurements (no timed asserts).

bench/data.py's smoke test is in tests/test_pipeline.py.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from bench import (
  ablations,
  common,
  encoders,
  evaluation,
  position_probe,
  query_init,
  train_step,
)
from data_prep import expressions

pytestmark = pytest.mark.slow  # The fast tier: pytest -m 'not slow'.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(main, tmp_path, *argv):
  path = tmp_path / "out.json"
  assert main(["--tiny", "--json", str(path), *argv]) == 0
  out = json.loads(path.read_text())
  assert out["hardware"]["usable_cpus"] >= 1
  assert out["settings"]["tiny"] is True
  return out


def test_encoders_tiny(tmp_path, capsys):
  out = _run(encoders.main, tmp_path)
  rows = {(r["encoder"], r["form"], r["batch"]): r for r in out["results"]}
  assert set(rows) == {
    ("image", "pooled", 1),
    ("image", "pooled", 2),
    ("image", "dense", 1),
    ("image", "dense", 2),
    ("text", "sentence", 2),
  }
  for r in rows.values():
    assert r["jax"]["median_ms"] > 0 and r["jax"]["compile_s"] > 0
    assert r["gflops_per_sample"] > 0
  layouts = {"image": {"nchw", "channels_last"}, "text": {"default"}}
  if encoders.openai_clip_module() is None:
    assert out["torch"] == "missing"
  else:
    for (encoder, form, _), r in rows.items():
      expected = set() if form == "dense" else layouts[encoder]
      assert set(r["torch"]) == expected
      for t in r["torch"].values():
        # Same weights, same inputs: the outputs agree.
        assert t["max_abs_diff"] <= 1e-4 * max(t["torch_max_abs"], 1.0)
        assert t["ratio"] == pytest.approx(
          r["jax"]["median_ms"] / t["median_ms"]
        )
  assert "JAX/torch" in capsys.readouterr().out


def test_train_step_tiny(tmp_path, capsys):
  config = os.path.join(ROOT, "configs", "tiny.py:baseline")
  out = _run(
    train_step.main,
    tmp_path,
    *("--config", config, "--dtype", "float32", "--devices", "1"),
    *("--scan_layers", "true,false"),
  )
  scanned, unrolled = out["results"]
  assert (scanned["scan_layers"], unrolled["scan_layers"]) == (True, False)
  # Every scanned block counts (the tiny text tower scans 2 layers).
  assert scanned["gflops_per_sample"] == pytest.approx(
    unrolled["gflops_per_sample"], rel=1e-3
  )
  for r in out["results"]:
    assert (r["dtype"], r["global_batch"], r["devices"]) == ("float32", 2, 1)
    for key in ("compile_s", "first_step_s", "samples_per_s", "mfu"):
      assert r[key] > 0, key
    assert r["gflops_per_step"] == pytest.approx(2 * r["gflops_per_sample"])
    # MFU against the higher of the peaks measured before and after.
    peaks = [r["matmul"][k]["tflops_per_s"] for k in ("before", "after")]
    assert r["peak_tflops_per_device"] == max(peaks) > 0
    assert r["matmul"]["after"]["gflops"] == pytest.approx(2 * 256**3 / 1e9)
    assert r["mfu"] == pytest.approx(
      r["achieved_tflops_per_device"] / r["peak_tflops_per_device"]
    )
    assert 0 < r["memory_gib"]["peak"] < 1
    assert math.isfinite(r["loss"])
  assert "MFU %" in capsys.readouterr().out


def test_evaluation_tiny(tmp_path, capsys):
  out = _run(evaluation.main, tmp_path, "--devices", "2")
  r = out["results"]
  assert r["expressions"] > 0 and r["batches"] >= 1
  assert r["expressions_per_s"] > 0 and r["pipeline_samples_per_s"] > 0
  assert out["model"]["devices"] == 2
  assert "Evaluator expr/s" in capsys.readouterr().out


def test_common_helpers(capsys):
  table = common.Table([("name", "name", "s"), ("ms", "ms", ".1f")])
  table.header()
  table.row({"name": "a", "ms": 1.26})
  table.row({"name": "b"})
  # Columns are 8 wide (titles + 2, at least 8); the first is left-aligned.
  assert capsys.readouterr().out.splitlines() == [
    "name" + " " * 10 + "ms",
    "a" + " " * 12 + "1.3",
    "b" + " " * 14 + "-",
  ]


def test_query_init_tiny(tmp_path, capsys):
  out = _run(query_init.main, tmp_path, "--stds", "0.02,1")
  cosines = {r["std"]: r["cosine"] for r in out["results"]}
  assert set(cosines) == {0.02, 1.0}
  assert all(-1 <= c <= 1 for c in cosines.values())
  assert "cos q^1" in capsys.readouterr().out


def test_ablations_tiny_trains_scores_and_reuses(tmp_path, capsys):
  argv = ("--workdir", str(tmp_path / "runs"), "--variants", "baseline")
  out = _run(ablations.main, tmp_path, *argv, "--seeds", "0")
  (run,) = out["runs"]
  assert run["variant"] == "baseline" and run["wall_s"] > 0
  results = json.loads(
    (tmp_path / "runs/baseline-seed0/results.json").read_text()
  )
  assert run["mIoU"] == pytest.approx(
    sum(
      r["original"]["mIoU"] * r["original"]["expressions"]
      for r in results["results"]
    )
    / sum(r["original"]["expressions"] for r in results["results"])
  )
  # The balanced data: every kind is scored.
  assert set(run["by_kind"]) == set(expressions.KINDS)
  (row,) = out["results"]
  assert row["delta"] == 0 and row["paper_delta"] == 0 and row["mIoU_sd"] == 0
  assert "| baseline |" in capsys.readouterr().out
  # A finished run is reused, not trained again.
  stamp = os.path.getmtime(tmp_path / "runs/baseline-seed0/results.json")
  again = _run(ablations.main, tmp_path, *argv, "--seeds", "0")
  assert again["runs"] == out["runs"]
  assert (
    os.path.getmtime(tmp_path / "runs/baseline-seed0/results.json") == stamp
  )


def test_ablations_table_against_the_paper():
  def run(variant, seed, miou):
    kinds = {"colour": miou + 10, "position": miou - 10}
    return dict(variant=variant, seed=seed, mIoU=miou, by_kind=kinds, wall_s=60)

  runs = [run("baseline", 0, 50), run("baseline", 1, 54), run("full", 0, 70)]
  for r in runs:
    r["Pr@0.5"], r["Pr@0.9"] = r["mIoU"], 0.0
  base, full = ablations.summarize(runs)
  assert (base["mIoU"], base["mIoU_sd"], base["seeds"]) == (52, 2, [0, 1])
  assert base["by_kind"]["position"] == (42, 2)
  assert full["delta"] == 18
  assert full["paper_delta"] == pytest.approx(70.43 - 62.57)
  text = ablations.table([base, full]).splitlines()
  assert text[0].split()[:4] == ["variant", "mIoU", "vs", "baseline"]
  assert text[2].split()[:5] == ["full", "70.0", "±", "0.0", "+18.0"]


def test_gpu_kit_runs_every_step_in_tiny_mode(tmp_path):
  """bench/gpu_kit.sh as a lent GPU machine runs it, each step in its --tiny
  mode on CPU: every step exits 0 and writes its JSON."""
  env = dict(
    os.environ,
    KIT_TINY="1",
    OUT=str(tmp_path / "out"),
    KIT_WORKDIR=str(tmp_path / "ablations"),
    PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    XLA_FLAGS="",  # one CPU device, as on the one-GPU machine
  )
  # The kit calls python3: make it this interpreter (a wrapper, not a
  # symlink, so that a virtual environment still finds its packages).
  (tmp_path / "bin").mkdir()
  wrapper = tmp_path / "bin" / "python3"
  wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  wrapper.chmod(0o755)
  env["PATH"] = str(tmp_path / "bin") + os.pathsep + env["PATH"]
  subprocess.run(
    ["bash", "bench/gpu_kit.sh"], cwd=ROOT, env=env, check=True, timeout=900
  )
  log = (tmp_path / "out" / "log.txt").read_text()
  for name in ("train_step", "encoders", "ablations", "position_probe"):
    assert f"== {name}: exit 0" in log, log[-2000:]
    out = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    assert out["settings"]["tiny"] is True and out["results"]
  # The same variants as on the GPU: the baseline and the full model.
  assert "=== full, seed 0" in log and "=== wo_pan" not in log


def test_position_probe_tiny(tmp_path, capsys):
  out = _run(position_probe.main, tmp_path, "--options", "none,all")
  assert [r["option"] for r in out["results"]] == ["none", "all"]
  for r in out["results"]:
    assert 0 <= r["seed0"] <= 1 and r["mean"] == r["seed0"]
  assert "mIoU mean" in capsys.readouterr().out
