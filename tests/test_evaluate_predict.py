"""Evaluation CLI and prediction on one tiny workdir.

The workdir is what training leaves (config.json, synthetic data,
checkpoints/ with validation metrics) but its state is random, written
without compiling anything: training and `init` take minutes to compile on
CPU, and evaluate/predict only need a restorable checkpoint. The classifier
is set so that a pixel is foreground iff one logit is > 0 (the other is
exactly 0): masks are non-trivial, and the rounding differences between the
device (float32) and host (float64) resamplings can only flip a pixel whose
interpolated logit is within rounding error of 0.
"""

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from flax_test_utils import ynnpack_ops
from PIL import Image

from configs import tiny
from jmceln_jax import predict
from jmceln_jax.data import datasets, records
from jmceln_jax.evaluation import metrics, offline, scoring
from jmceln_jax.serving import inference, stablehlo, web
from jmceln_jax.training import checkpoints, model_state

pytestmark = pytest.mark.slow  # The fast tier: pytest -m 'not slow'.

SPLITS = ("val", "testA")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _init_like(abstract, seed):
  """Numpy values for an abstract variables tree: normalisation scales and
  variances 1, biases and means 0, other leaves N(0, 1 / fan_in)."""
  rng = np.random.default_rng(seed)

  def fill(path, a):
    name = getattr(path[-1], "key", "")
    if name in ("scale", "var"):
      return np.ones(a.shape, a.dtype)
    if name in ("bias", "mean"):
      return np.zeros(a.shape, a.dtype)
    fan_in = max(int(np.prod(a.shape[:-1])), 1)
    return (rng.standard_normal(a.shape) / np.sqrt(fan_in)).astype(a.dtype)

  return jax.tree.map_with_path(fill, abstract)


def _random_state(abstract):
  """A TrainState of numpy values with the abstract state's structure."""
  params = _init_like(abstract.params, seed=0)
  kernel = params["head"]["classifier"]["kernel"]
  kernel[..., 1] -= kernel[..., 0]
  kernel[..., 0] = 0.0
  zeros = lambda a: np.zeros(a.shape, a.dtype)  # noqa: E731
  return abstract.replace(
    step=zeros(abstract.step),
    params=params,
    batch_stats=_init_like(abstract.batch_stats, seed=1),
    opt_state=jax.tree.map(zeros, abstract.opt_state),
    rng=zeros(abstract.rng),
  )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("run"))
  config = tiny.get_config()
  datasets.resolve_data_dir(config, path)
  setup = model_state.build_setup(config, num_train_refs=1)
  state = _random_state(setup.abstract_state)  # Host arrays save fastest.
  ckpt = checkpoints.Checkpointer(
    os.path.join(path, "checkpoints"),
    best_metric=model_state.BEST_METRIC,
    async_save=False,
  )
  ckpt.save(3, state, {"train": {}}, metrics={model_state.BEST_METRIC: 1.0})
  ckpt.close()
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return path


@pytest.fixture(scope="module")
def evaluated(workdir, tmp_path_factory):
  """(stdout, predictions dir, stderr) of the evaluate CLI on two splits."""
  out = str(tmp_path_factory.mktemp("predictions"))
  cmd = [
    sys.executable, "-m", "jmceln_jax.evaluate", f"--workdir={workdir}",
    f"--splits={','.join(SPLITS)}", f"--save_predictions={out}",
    "--num_examples=2",
  ]  # fmt: skip
  # The same compiler settings as this process (see conftest.py).
  fast = jax.config.read("jax_disable_most_optimizations")
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS=str(int(fast)))
  proc = subprocess.run(
    cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, out, proc.stderr


@pytest.fixture(scope="module")
def predictor(workdir):
  return inference.Predictor.from_workdir(workdir)


def _records(workdir, split):
  return list(
    records.iter_records(os.path.join(workdir, "data/prepared"), split)
  )


@pytest.mark.parametrize("split", SPLITS)
def test_evaluate_saved_masks_recompute_metrics(workdir, evaluated, split):
  stdout, out, _ = evaluated
  recs = _records(workdir, split)
  with open(os.path.join(out, split, "index.json")) as f:
    rows = json.load(f)["predictions"]
  # Every expression exactly once, in split order.
  expected = [
    (r["ref_id"], s) for r in recs for s in range(len(r["sentences"]))
  ]
  assert [(d["ref_id"], d["sent_idx"]) for d in rows] == expected
  assert [d["index"] for d in rows] == list(range(len(expected)))
  by_ref = {r["ref_id"]: r for r in recs}
  inter, union, share = [], [], []
  for d in rows:
    rec = by_ref[d["ref_id"]]
    assert d["sentence"] == rec["sentences"][d["sent_idx"]]
    assert d["image_id"] == rec["image_id"]
    pred = np.asarray(Image.open(os.path.join(out, split, d["file"]))) > 127
    gt = records.decode_mask(rec) != 0
    assert pred.shape == gt.shape
    share.append(pred.mean())
    inter.append((pred & gt).sum())
    union.append((pred | gt).sum())
  assert 0 < max(share) and min(share) < 1  # Non-trivial masks.
  with open(os.path.join(workdir, "eval", f"{split}-3.json")) as f:
    saved = json.load(f)
  np.testing.assert_array_equal(inter, saved["per_expression"]["original_i"])
  np.testing.assert_array_equal(union, saved["per_expression"]["original_u"])
  recomputed = metrics.summarize(inter, union, "original")
  assert {k: saved["original"][k] for k in recomputed} == recomputed
  # The printed row carries the same numbers.
  printed = re.search(rf"^{split}\s+original\s+(.*)$", stdout, re.M).group(1)
  cells = printed.split()
  assert int(cells[0]) == len(rows)
  assert cells[1:] == [f"{recomputed[c]:.2f}" for c in metrics.COLUMNS]
  assert re.search(rf"^{split}\s+network\s", stdout, re.M)
  # Per kind: the synthetic records carry each sentence's kind.
  kinds = np.array([k for r in recs for k in r["sentence_kinds"]])
  assert set(saved["by_kind"]) == set(kinds)
  for kind, got in saved["by_kind"].items():
    keep = kinds == kind
    want = metrics.summarize(
      np.array(inter)[keep], np.array(union)[keep], "original"
    )
    assert got == {c: want[c] for c in ("expressions", *scoring.KIND_COLUMNS)}
    row = re.search(rf"^{split}\s+{kind}\s+(.*)$", stdout, re.M).group(1)
    assert row.split() == [str(got["expressions"])] + [
      f"{got[c]:.2f}" for c in scoring.KIND_COLUMNS
    ]
  assert os.path.isfile(
    os.path.join(workdir, "eval", f"{split}-3-examples.png")
  )


def test_evaluate_prints_table1_row(evaluated):
  stdout, _, stderr = evaluated
  assert "Table 1 layout" in stdout and '"original"' in stdout
  row = re.search(r"^this run\s+(.*)$", stdout, re.M).group(1).split()
  assert len(row) == len(SPLITS)
  # Neither orbax's read-only warnings nor a wrong-size warning.
  assert "read only" not in stderr and "read_only" not in stderr
  assert "warning" not in stdout


def test_evaluate_warns_of_another_image_size(workdir):
  config = model_state.load_config(workdir).copy_and_resolve_references()
  config.input.image_size = 96
  out = offline.evaluate_workdir(
    workdir, config=config, splits=["val"], num_examples=0, progress=False
  )
  assert len(out["warnings"]) == 1
  assert "image_size is 96, but the run was trained at 64" in out["warnings"][0]
  with open(out["files"][0]) as f:
    written = json.load(f)
  assert written["image_size"] == {"evaluated": 96, "trained": 64}
  assert written["warnings"] == out["warnings"]


def test_predictor_matches_evaluation_preprocessing(
  workdir, evaluated, predictor
):
  _, out, _ = evaluated
  rec = _records(workdir, "val")[0]
  with open(os.path.join(out, "val", "index.json")) as f:
    first = json.load(f)["predictions"][0]
  saved = np.asarray(Image.open(os.path.join(out, "val", first["file"]))) > 127
  np.testing.assert_array_equal(
    predictor(rec["image"], first["sentence"])[0], saved
  )


def test_table1_row_next_to_paper():
  results = [
    {"split": s, "original": {"mIoU": v}}
    for s, v in (("val", 1.5), ("testB", 2))
  ]
  lines = scoring.table1(results, "RefCOCO+").splitlines()
  assert "RefCOCO+" in lines[0] and '"original"' in lines[0]
  assert lines[1].split() == ["val", "testA", "testB"]
  assert lines[2].split() == ["this", "run", "1.50", "-", "2.00"]
  assert lines[3].split()[-3:] == ["66.99", "72.69", "57.34"]


def test_predictor_leaves_convolutions_to_xla(predictor):
  """Prediction compiles with xla_options.for_dtype (float32, CPU)."""
  size, length = predictor.image_size, tiny.get_config().input.max_len
  compiled = predictor._forward.lower(
    predictor.state,
    np.zeros((1, size, size, 3), np.uint8),
    np.zeros((1, length), np.int32),
  ).compile()
  assert " convolution(" in compiled.as_text()
  assert "convolution" not in ynnpack_ops(compiled.as_text())


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_predict_any_mode_and_odd_size(predictor, mode):
  rng = np.random.default_rng(0)
  shape = (53, 37) if mode == "L" else (41, 67, 4)
  image = Image.fromarray(rng.integers(0, 256, shape, np.uint8), mode)
  pred = predictor.predict(image, ["the left one", "a round red thing"])
  assert pred.masks.shape == (2, *shape[:2]) and pred.masks.dtype == bool
  assert pred.probabilities.shape == pred.masks.shape
  # P(object) is >= 0.5 exactly on the mask (== 0.5 only for tiny logits).
  assert np.all(pred.probabilities[pred.masks] >= 0.5)
  assert np.all(pred.probabilities[~pred.masks] <= 0.5)
  assert predictor(image, "the left one").shape == (1, *shape[:2])


def test_predict_applies_exif_rotation(predictor, tmp_path):
  path = str(tmp_path / "rotated.jpg")
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  Image.new("RGB", (50, 30), (200, 30, 30)).save(path, exif=exif)
  assert predictor(path, "the red square").shape == (1, 50, 30)


def test_predict_cli_writes_pngs(workdir, tmp_path, capsys):
  image = str(tmp_path / "palette.png")
  Image.new("P", (45, 29), 3).save(image)
  out, mask = str(tmp_path / "out.png"), str(tmp_path / "mask.png")
  predict.main([
    "--workdir", workdir, "--image", image, "--text", "the left one",
    "--text", "a round red thing", "--out", out, "--mask_out", mask,
  ])  # fmt: skip
  assert "the left one" in capsys.readouterr().out
  assert Image.open(out).size[0] > 0
  for k in range(2):
    assert Image.open(str(tmp_path / f"mask_{k}.png")).size == (45, 29)


def test_clear_errors(workdir, tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    offline.evaluate_workdir(missing)
  with pytest.raises(SystemExit, match="Workdir .* does not exist"):
    predict.main(["--workdir", missing, "--image", "x.png", "--text", "a",
                  "--out", "o.png"])  # fmt: skip
  with pytest.raises(FileNotFoundError, match="No prepared split 'testC'"):
    offline.evaluate_workdir(workdir, splits=["testC"])
  empty = tmp_path / "empty"
  empty.mkdir()
  config = model_state.load_config(workdir).copy_and_resolve_references()
  config.input.data_dir = os.path.join(workdir, "data/prepared")
  with pytest.raises(FileNotFoundError, match="No checkpoints in"):
    offline.evaluate_workdir(str(empty), config=config, splits=["val"])
  with pytest.raises(FileNotFoundError, match="No checkpoint at step 7"):
    model_state.restore_state(workdir, None, checkpoint=7)


_STANDALONE = """
import sys
import numpy as np
from jmceln_exported import ExportedModel
masks, probs = ExportedModel(".").predict(sys.argv[1], sys.argv[2:])
np.save("masks.npy", masks)
loaded = [m for m in sys.modules if m.split(".")[0] in ("flax", "jmceln_jax")]
assert not loaded, loaded
"""


def test_export_runs_without_the_project_and_matches_predictor(
  predictor, tmp_path
):
  out = stablehlo.write(str(tmp_path / "exported"), predictor)
  with open(os.path.join(out, "model.stablehlo"), "rb") as f:
    function = jax.export.deserialize(bytearray(f.read()))
  assert function.platforms == ("cpu", "cuda")
  images, tokens = function.in_avals[-2:]
  assert str(images.shape[0]) == str(tokens.shape[0]) == "b"  # Any batch.
  image = str(tmp_path / "scene.png")
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 256, (45, 70, 3), np.uint8)).save(image)
  sentences = ["the left one", "big red circle", "a &amp; b"]
  # In a fresh interpreter, in the export folder, without this checkout.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run(
    [sys.executable, "-c", _STANDALONE, image, *sentences],
    cwd=out,
    env=env,
    check=True,
  )
  masks = np.load(os.path.join(out, "masks.npy"))
  np.testing.assert_array_equal(masks, predictor(image, sentences))
  assert 0 < masks.mean() < 1
  with pytest.raises(FileExistsError, match="exists"):
    stablehlo.write(out, predictor)


def _http(url, body=None):
  """(status, JSON or bytes) of a GET, or of a POST of `body` as JSON."""
  data = None if body is None else json.dumps(body).encode()
  try:
    with urllib.request.urlopen(url, data, timeout=300) as r:
      raw, status, kind = r.read(), r.status, r.headers["Content-Type"]
  except urllib.error.HTTPError as e:
    raw, status, kind = e.read(), e.code, e.headers["Content-Type"]
  return status, json.loads(raw) if kind == "application/json" else raw


def test_web_demo_serves_predictors_masks(workdir, predictor, tmp_path):
  httpd = web.serve(workdir, port=0)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{httpd.server_address[1]}"
  try:
    status, page = _http(url + "/")
    assert status == 200 and b"/api/predict" in page
    _, listed = _http(url + "/api/examples")
    first = _records(workdir, "testA")[0]
    assert listed["examples"][0]["sentences"] == first["sentences"]
    status, png = _http(url + "/example/0")
    assert status == 200 and Image.open(io.BytesIO(png)).size == (
      first["width"],
      first["height"],
    )
    sentences = ["the left one", "big red circle"]
    status, out = _http(
      url + "/api/predict", {"example": 0, "sentences": sentences}
    )
    assert status == 200 and out["seconds"] > 0
    want = predictor(first["image"], sentences)
    for result, mask in zip(out["results"], want, strict=True):
      got = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["mask"]))))
      np.testing.assert_array_equal(got > 127, mask)
    # An upload, and clear errors.
    upload = base64.b64encode(first["image"]).decode()
    _, same = _http(
      url + "/api/predict", {"image": upload, "sentences": sentences}
    )
    assert [r["mask"] for r in same["results"]] == [
      r["mask"] for r in out["results"]
    ]
    status, err = _http(
      url + "/api/predict", {"example": 0, "sentences": [" "]}
    )
    assert status == 400 and "sentence" in err["error"]
    status, err = _http(
      url + "/api/predict", {"image": "bm90IGFuIGltYWdl", "sentences": ["x"]}
    )
    assert status == 400 and "Cannot read the image" in err["error"]
  finally:
    httpd.shutdown()
    httpd.server_close()
