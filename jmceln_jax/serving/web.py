"""The web demo's server: a page, its JSON API and the `Demo` behind it
(stdlib http.server over `Predictor`).
"""

from __future__ import annotations

import base64
import binascii
import html
import io
import json
import os
import threading
import time
import urllib.parse
from http import server
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from jmceln_jax.data import pipeline, records
from jmceln_jax.evaluation import visualize
from jmceln_jax.serving import inference
from jmceln_jax.training import model_state
from jmceln_jax.utils import paths

MAX_SENTENCES = 8
MAX_UPLOAD = 20 * 2**20  # Bytes of one request.


def _png(array: np.ndarray) -> str:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "PNG")
  return base64.b64encode(buf.getvalue()).decode()


def examples(workdir: str, count: int = 8) -> list[dict[str, Any]]:
  """The first `count` images of the run's first test split, with their
  sentences ([] when the data are gone)."""
  cfg = model_state.load_config(workdir).input
  data_dir = cfg.data_dir or os.path.join(workdir, "data", "prepared")
  split = (list(cfg.test_splits) or [cfg.val_split])[0]
  try:
    source = pipeline.split_source(data_dir, split)
  except (FileNotFoundError, ValueError) as e:
    logging.warning("No example images: %s", e)
    return []
  out, seen = [], set()
  for i in range(len(source)):
    record = records.decode_record(source[i])
    if record["image_id"] in seen:
      continue
    seen.add(record["image_id"])
    out.append(
      dict(
        name=f"{split} image {record['image_id']}",
        image=record["image"],
        sentences=list(record["sentences"]),
      )
    )
    if len(out) == count:
      break
  return out


class Demo:
  """What the server does, without the HTTP: prediction on examples or
  uploads, serialised by a lock (one forward pass at a time)."""

  def __init__(self, predictor: inference.Predictor, examples_: list[dict]):
    self.predictor = predictor
    self.examples = examples_
    self._lock = threading.Lock()

  def predict(self, request: dict[str, Any]) -> dict[str, Any]:
    """The /api/predict answer (see the module docstring).

    Raises:
      ValueError: for a request that cannot be served (the message says why).
    """
    sentences = [s for s in request.get("sentences", []) if str(s).strip()]
    if not sentences:
      raise ValueError("Type at least one sentence.")
    if len(sentences) > MAX_SENTENCES:
      raise ValueError(f"At most {MAX_SENTENCES} sentences at a time.")
    if "example" in request:
      k = int(request["example"])
      if not 0 <= k < len(self.examples):
        raise ValueError(f"No example {k}.")
      image: Any = self.examples[k]["image"]
    else:
      try:
        image = base64.b64decode(request["image"], validate=True)
      except (KeyError, TypeError, binascii.Error) as e:
        raise ValueError("Give an image (base64) or an example.") from e
    start = time.perf_counter()
    with self._lock:
      try:
        pred = self.predictor.predict(image, sentences)
      except OSError as e:  # PIL: not an image.
        raise ValueError(f"Cannot read the image: {e}") from None
    seconds = time.perf_counter() - start
    results = [
      dict(
        sentence=text,
        overlay=_png(visualize.overlay(pred.image, mask)),
        probability=_png(np.rint(prob * 255).astype(np.uint8)),
        mask=_png(mask.astype(np.uint8) * 255),
      )
      for text, mask, prob in zip(
        pred.texts, pred.masks, pred.probabilities, strict=True
      )
    ]
    return dict(
      results=results, seconds=seconds, size=list(pred.image.shape[:2])
    )


def make_handler(demo: Demo, page: bytes) -> type:
  """The request handler class of a server around `demo`."""

  class Handler(server.BaseHTTPRequestHandler):
    def _send(self, code: int, body: bytes, kind: str) -> None:
      self.send_response(code)
      self.send_header("Content-Type", kind)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
      self._send(code, json.dumps(obj).encode(), "application/json")

    def do_GET(self):  # noqa: N802 (the http.server interface)
      path = urllib.parse.urlsplit(self.path).path
      if path in ("/", "/index.html"):
        self._send(200, page, "text/html; charset=utf-8")
      elif path == "/api/examples":
        listed = [
          dict(name=e["name"], sentences=e["sentences"]) for e in demo.examples
        ]
        self._json(200, dict(examples=listed))
      elif path.startswith("/example/"):
        k = path.rsplit("/", 1)[-1]
        if not k.isdigit() or int(k) >= len(demo.examples):
          return self._json(404, dict(error=f"No example {k}."))
        rgb = np.asarray(Image.open(io.BytesIO(demo.examples[int(k)]["image"])))
        self._send(200, base64.b64decode(_png(rgb)), "image/png")
      else:
        self._json(404, dict(error=f"No page {path}."))

    def do_POST(self):  # noqa: N802
      if self.path != "/api/predict":
        return self._json(404, dict(error=f"No API {self.path}."))
      length = int(self.headers.get("Content-Length", 0))
      if length > MAX_UPLOAD:
        return self._json(413, dict(error="The image is too large."))
      try:
        request = json.loads(self.rfile.read(length))
        self._json(200, demo.predict(request))
      except (ValueError, AttributeError) as e:
        self._json(400, dict(error=str(e)))

    def log_message(self, format, *args):  # noqa: A002 (the interface)
      logging.info("%s %s", self.address_string(), format % args)

  return Handler


def serve(
  workdir: str, *, host: str = "127.0.0.1", port: int = 7860
) -> server.ThreadingHTTPServer:
  """A server for the run (not yet serving: call serve_forever()); port 0
  picks a free one (`server.server_address[1]`)."""
  workdir = paths.absolute(workdir)
  predictor = inference.Predictor.from_workdir(workdir)
  demo = Demo(predictor, examples(workdir))
  which, step = predictor.checkpoint
  title = f"JMCELN demo: {workdir} ({which} checkpoint, step {step})"
  page = PAGE.replace("{{TITLE}}", html.escape(title)).encode()
  return server.ThreadingHTTPServer((host, port), make_handler(demo, page))


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>JMCELN demo</title>
<style>
body{font-family:sans-serif;margin:1.5em;max-width:1100px}
.row{display:flex;gap:1em;flex-wrap:wrap;align-items:flex-start}
.card{border:1px solid #ccc;padding:.5em;border-radius:6px}
.card img{width:300px;display:block;margin-top:.3em}
textarea{width:28em;height:6em}
#status{color:#555}
</style></head><body>
<h2>{{TITLE}}</h2>
<div class="row"><div>
<p>Image: <input type="file" id="file" accept="image/*">
or example <select id="example"><option value="">-</option></select></p>
<p>Sentences, one per line:<br><textarea id="text">the red one</textarea></p>
<button id="go">Segment</button> <span id="status"></span>
</div><img id="preview" style="width:300px"></div>
<div class="row" id="results"></div>
<script>
let upload = null;
const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
fetch('/api/examples').then(r => r.json()).then(d => {
  d.examples.forEach((e, k) => {
    const o = document.createElement('option'); o.value = k;
    o.textContent = e.name; $('example').appendChild(o);
  });
  if (query.has('example')) {  // A link that segments at once.
    const k = query.get('example'); $('example').value = k;
    $('preview').src = '/example/' + k;
    $('text').value = query.getAll('text').join('\\n') ||
      d.examples[k].sentences.join('\\n');
    $('go').onclick();
  }
});
$('example').onchange = () => {
  const k = $('example').value; if (k === '') return;
  upload = null; $('file').value = ''; $('preview').src = '/example/' + k;
  fetch('/api/examples').then(r => r.json()).then(d => {
    $('text').value = d.examples[k].sentences.join('\\n'); });
};
$('file').onchange = () => {
  const f = $('file').files[0]; if (!f) return;
  const reader = new FileReader();
  reader.onload = () => { upload = reader.result.split(',')[1];
    $('preview').src = reader.result; $('example').value = ''; };
  reader.readAsDataURL(f);
};
$('go').onclick = async () => {
  const body = {sentences: $('text').value.split('\\n')};
  if (upload) body.image = upload;
  else if ($('example').value !== '') body.example = +$('example').value;
  $('status').textContent = 'segmenting...';
  const r = await fetch('/api/predict', {method: 'POST', body: JSON.stringify(body)});
  const d = await r.json();
  if (!r.ok) { $('status').textContent = 'error: ' + d.error; return; }
  $('status').textContent = d.seconds.toFixed(2) + ' s for ' + d.results.length +
    ' sentence(s), image ' + d.size[1] + 'x' + d.size[0];
  $('results').innerHTML = '';
  for (const x of d.results) {
    const c = document.createElement('div'); c.className = 'card';
    const t = document.createElement('b'); t.textContent = x.sentence;
    c.appendChild(t);
    for (const key of ['overlay', 'probability']) {
      const i = document.createElement('img'); i.src = 'data:image/png;base64,' + x[key];
      i.title = key; c.appendChild(i);
    }
    $('results').appendChild(c);
  }
};
</script></body></html>
"""
