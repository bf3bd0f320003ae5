"""Letterbox geometry, its inverse, image loading and normalisation."""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from jmceln_jax.data import preprocess as pp

# (h, w, S): landscape, portrait, square, odd sizes; down- and upsampling.
SHAPES = [(37, 53, 32), (53, 37, 32), (41, 41, 32), (23, 30, 64), (31, 17, 64)]
CANVAS = 64


def _mask(h, w):
  """An ellipse plus a rectangle, away from the edges, and a corner block."""
  y, x = np.mgrid[:h, :w]
  ell = ((y - 0.45 * h) / (0.3 * h)) ** 2 + ((x - 0.4 * w) / (0.25 * w)) ** 2
  m = ell < 1
  m[int(0.7 * h) : int(0.9 * h), int(0.5 * w) : int(0.95 * w)] = True
  m[:3, -4:] = True
  return m.astype(np.uint8)


def _near_boundary(mask, radius):
  """Pixels within `radius` (Chebyshev) of a pixel of the other class."""
  pad = np.pad(mask, radius, mode="edge")
  h, w = mask.shape
  near = np.zeros_like(mask, bool)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      near |= pad[dy : dy + h, dx : dx + w] != mask
  return near


def test_params():
  assert pp.letterbox_params(480, 640, 416) == (480, 640, 312, 416, 52, 0)
  assert pp.letterbox_params(640, 427, 416) == (640, 427, 416, 278, 0, 69)
  assert pp.letterbox_params(5, 5, 416) == (5, 5, 416, 416, 0, 0)
  assert pp.letterbox_params(1, 1000, 416) == (1, 1000, 1, 416, 207, 0)
  np.testing.assert_array_equal(
    pp.letterbox_params(3, 4, 8).as_array(), np.int32([3, 4, 6, 8, 1, 0])
  )
  with pytest.raises(ValueError, match="letterbox"):
    pp.letterbox_params(0, 4, 8)


def test_prepare_image(tmp_path):
  img = np.random.default_rng(0).integers(0, 256, (9, 6, 3), np.uint8)
  path = tmp_path / "x.png"
  Image.fromarray(img).save(path)
  canvas, box = pp.prepare_image(path, 12)
  want, want_box = pp.letterbox_image(img, 12)
  np.testing.assert_array_equal(canvas, want)
  assert box == want_box == (9, 6, 12, 8, 0, 2)
  assert canvas[box.region].shape == (12, 8, 3)


def test_letterbox_image_fill_and_content():
  img = np.random.default_rng(0).integers(0, 256, (20, 40, 3), np.uint8)
  canvas, box = pp.letterbox_image(img, 16)
  assert canvas.shape == (16, 16, 3) and canvas.dtype == np.uint8
  assert box == (20, 40, 8, 16, 4, 0)
  assert pp.FILL == (123, 117, 104)
  np.testing.assert_array_equal(
    canvas[:4], np.broadcast_to(pp.FILL, (4, 16, 3))
  )
  np.testing.assert_array_equal(
    canvas[12:], np.broadcast_to(pp.FILL, (4, 16, 3))
  )
  want = Image.fromarray(img).resize((16, 8), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(canvas[4:12], np.asarray(want))


@pytest.mark.parametrize("h,w,size", SHAPES)
def test_inverse_letterbox_recovers_mask(h, w, size):
  mask = _mask(h, w)
  img = np.zeros((h, w, 3), np.uint8)
  _, box = pp.letterbox_image(img, size)
  target = pp.letterbox_mask(mask, box, size)
  assert target.shape == (size, size) and set(np.unique(target)) <= {0, 1}
  logits = np.stack([1.0 - target, target], -1).astype(np.float32)
  inside = np.zeros((size, size), bool)
  inside[box.region] = True
  logits[~inside] = (-100.0, 100.0)  # Border logits must never leak in.

  boxes = np.stack([box.as_array()] * 2)
  maps, valid = jax.jit(pp.unletterbox, static_argnums=2)(
    np.stack([logits] * 2), boxes, CANVAS
  )
  assert maps.shape == (2, CANVAS, CANVAS, 2) and valid.shape == (
    2,
    CANVAS,
    CANVAS,
  )
  np.testing.assert_array_equal(
    valid[0], np.pad(np.ones((h, w), bool), ((0, CANVAS - h), (0, CANVAS - w)))
  )
  np.testing.assert_array_equal(maps[0, h:], 0.0)
  pred = np.asarray(maps[0, :h, :w].argmax(-1), np.uint8)

  # Within one network pixel of the true border, in original pixels.
  radius = int(np.ceil(max(h / box.new_height, w / box.new_width)))
  wrong = pred != mask
  assert not (wrong & ~_near_boundary(mask, radius)).any()
  assert wrong.mean() < 0.1

  host = pp.unletterbox_numpy(logits, box)
  np.testing.assert_allclose(host, maps[1, :h, :w], atol=1e-5)
  np.testing.assert_allclose(
    pp.unletterbox_numpy(logits[..., 1], box.as_array()),
    host[..., 1],
    atol=1e-6,
  )


def test_mask_threshold():
  mask = np.zeros((4, 4), np.uint8)
  mask[:, 2:] = 1  # A step; 2x bilinear gives 0, 0, 0, .25, .75, 1, 1, 1.
  target = pp.letterbox_mask(mask, pp.letterbox_params(4, 4, 8), 8)
  np.testing.assert_array_equal(target, np.repeat(mask, 2, 0).repeat(2, 1))


def test_mask_shape_checked():
  box = pp.letterbox_params(4, 6, 8)
  with pytest.raises(ValueError, match="does not match"):
    pp.letterbox_mask(np.zeros((6, 4)), box, 8)


def _encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def test_load_exif_rotated(tmp_path):
  stored = np.zeros((20, 40, 3), np.uint8)  # h=20, w=40; red top-left.
  stored[:10, :20] = (255, 0, 0)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  data = _encode(
    Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()
  )
  path = tmp_path / "rot.jpg"
  path.write_bytes(data)
  for source in (data, path, str(path), Image.open(io.BytesIO(data))):
    img = pp.load_image(source)
    assert img.shape == (40, 20, 3) and img.dtype == np.uint8
    assert img[5, 15, 0] > 200 and img[5, 15, 1] < 50  # Top-right now red.
    assert img[35, 5].max() < 50


@pytest.mark.parametrize(
  "mode,value,rgb",
  [
    ("L", 77, (77, 77, 77)),
    ("LA", (77, 10), (77, 77, 77)),
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # Alpha dropped, not composited.
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ("1", 1, (255, 255, 255)),
  ],
)
def test_load_modes(mode, value, rgb):
  img = Image.new(mode, (5, 3), value)
  out = pp.load_image(_encode(img, "TIFF" if mode == "CMYK" else "PNG"))
  assert out.shape == (3, 5, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.broadcast_to(rgb, (3, 5, 3)))


def test_load_palette_and_16_bit():
  pal = Image.new("P", (4, 2), 1)
  pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
  pal.info["transparency"] = 1
  out = pp.load_image(_encode(pal, "PNG", transparency=1))
  np.testing.assert_array_equal(out, np.broadcast_to((200, 100, 50), (2, 4, 3)))
  deep = Image.fromarray(np.full((2, 3), 257 * 100, np.uint16))
  out = pp.load_image(_encode(deep, "PNG"))
  np.testing.assert_array_equal(out, np.full((2, 3, 3), 100, np.uint8))


def test_normalize_numpy_and_jax():
  img = np.random.default_rng(0).integers(0, 256, (4, 4, 3), np.uint8)
  host = pp.normalize(img)
  assert host.dtype == np.float32
  want = (img / 255.0 - np.array(pp.CLIP_MEAN)) / np.array(pp.CLIP_STD)
  np.testing.assert_allclose(host, want, atol=1e-5)
  np.testing.assert_allclose(jax.jit(pp.normalize)(img), host, atol=1e-6)
  fill = pp.normalize(np.array(pp.FILL, np.uint8))
  assert np.abs(fill).max() < 0.01


@pytest.mark.parametrize("h,w,size", SHAPES)
def test_forward_and_inverse_geometry_agree(h, w, size):
  """A linear ramp survives PIL letterbox + unletterbox away from the edges.

  Both resamplers reproduce linear functions exactly, so any half-pixel
  disagreement between them shows up as an offset of >= 3 grey levels.
  """
  y, x = np.mgrid[:h, :w]
  ramp = np.stack([255 * (y + 0.5) / h, 255 * (x + 0.5) / w, 0 * y], -1)
  canvas, box = pp.letterbox_image(np.rint(ramp).astype(np.uint8), size)
  back = pp.unletterbox_numpy(canvas.astype(np.float32), box)
  m = 4  # Edge margin: PIL's bicubic renormalises its kernel near borders.
  np.testing.assert_allclose(back[m:-m, m:-m], ramp[m:-m, m:-m], atol=1.5)
