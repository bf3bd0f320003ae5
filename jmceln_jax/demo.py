r"""A local web demo: upload an image (or pick a test image), type sentences,
see each mask.

  python -m jmceln_jax.demo --workdir runs/synthetic [--port 7860]

then open http://localhost:7860 (`/?example=K&text=...&text=...` segments
test image K at once). One page: an image (uploaded, or one of the
run's test images), one sentence per line, and for each sentence the mask
overlaid on the image (as `predict` draws it), its probability map and the
time taken. It runs on CPU or GPU through `inference.Predictor` (compiled once
per batch size of 1, 2, 4 or 8 sentences). The server is the standard
library's, with no extra dependency; its JSON API is what the page uses:

  GET  /api/examples   {"examples": [{"name", "sentences"}]}
  GET  /example/<k>    the k-th example image (PNG)
  POST /api/predict    {"image": base64 image file | "example": k,
                        "sentences": [str]} ->
                       {"results": [{"sentence", "overlay", "probability",
                        "mask"}], "seconds", "size": [h, w]}; images are
                        base64 PNGs, "mask" 8-bit grey (255 = object)

It listens on localhost only unless --host says otherwise.
"""

from __future__ import annotations

from absl import app, flags

from jmceln_jax import cli
from jmceln_jax.serving import web


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Training run directory.")
  flags.DEFINE_integer("port", 7860, "Port to listen on (0: any free one).")
  flags.DEFINE_string(
    "host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface)."
  )
  flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
  del argv  # cli.parse_flags refuses positional arguments.
  f = flags.FLAGS
  with cli.user_errors():
    httpd = web.serve(f.workdir, host=f.host, port=f.port)
  host, port = httpd.server_address[:2]
  print(f"Serving {f.workdir} on http://{host}:{port} (Ctrl-C stops).")
  try:
    httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    httpd.server_close()


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
