"""Decoding and per-modality preprocessing on real SAR / IR / optical samples and edge cases."""

import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from configs import fusion
from data_pipelines import preprocess as pp
from data_pipelines import views as views_lib


@pytest.fixture(scope="module")
def cfg():
  return fusion.get_config("tiny").model.vision.preprocess


def _decode(path):
  return pp.decode_image(path.read_bytes())


def _check_output(x, hw):
  assert x.shape == (*hw, 3) and x.dtype == np.float32
  assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0
  assert x.max() > x.min()  # not a blank image


def test_sirst_mixed_png_modes(shared_data, cfg):
  """SIRST stores IR as RGB, RGBA, grey and palette PNGs: all decode to the same layout."""
  seen = set()
  for path in sorted((shared_data / "SIRST" / "images").glob("*.png")):
    mode = Image.open(path).mode
    if mode in seen:
      continue
    seen.add(mode)
    raw = _decode(path)
    assert raw.dtype == np.uint8 and raw.shape[-1] == (1 if mode == "L" else 3), (mode, raw.shape)
    x = pp.preprocess(raw, "infrared", cfg)
    _check_output(x, raw.shape[:2])
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grey replicated
  assert seen == {"RGB", "RGBA", "L", "P"}


def test_infrared_percentile_normalisation(shared_data, cfg):
  path = next(iter(sorted((shared_data / "HIT-UAV" / "normal_xml" / "JPEGImages").glob("*.jpg"))))
  raw = _decode(path)
  assert raw.shape == (512, 640, 1)
  x = pp.preprocess(raw, "infrared", cfg)
  _check_output(x, (512, 640))
  lo, hi = np.percentile(raw.astype(np.float32), cfg.infrared_percentiles)
  expected = np.clip((raw[..., 0].astype(np.float32) - lo) / (hi - lo), 0, 1)
  np.testing.assert_allclose(x[..., 1], expected, atol=1e-6)
  # The same pixels stored as 16-bit give the same output (scale-free normalisation).
  x16 = pp.preprocess(raw.astype(np.uint16) * 257, "infrared", cfg)
  np.testing.assert_allclose(x16, x, atol=1e-5)


def test_sar_8bit_chips(shared_data, cfg):
  hrsid = sorted((shared_data / "HRSID_official_samples" / "data").glob("P*_[0-9]*.png"))
  hrsid = [p for p in hrsid if "instance" not in p.name]
  raw = _decode(hrsid[0])
  assert raw.shape == (800, 800, 3) and raw.dtype == np.uint8
  x = pp.preprocess(raw, "sar", cfg)
  _check_output(x, (800, 800))
  mstar = next(iter(sorted((shared_data / "MSTAR_hunterlew").rglob("*.jpeg"))))
  raw = _decode(mstar)
  assert raw.shape == (128, 128, 1)
  x = pp.preprocess(raw, "sar", cfg)
  _check_output(x, (128, 128))
  # 8-bit SAR is display-scaled already: no dB conversion, only the percentile stretch.
  lo, hi = np.percentile(raw.astype(np.float32), cfg.sar_percentiles)
  np.testing.assert_allclose(x[..., 0], np.clip((raw[..., 0] - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_optical_8bit_is_plain_scaling(shared_data, cfg):
  for rel in ["DOTA_devkit_example/example/images/P1888.png",
              "DIOR-RSVG_sample/RSVGD/JPEGImages/00001.jpg"]:
    raw = _decode(shared_data / rel)
    x = pp.preprocess(raw, "optical", cfg)
    _check_output(x, raw.shape[:2])
    np.testing.assert_array_equal(x, raw.astype(np.float32) / 255.0)
  rsicd = sorted((shared_data / "RSICD_captions_sample").rglob("*.jpg"))[0]
  x = pp.preprocess(_decode(rsicd), "optical", cfg)
  views = views_lib.make_views(x, 64, 2)  # the chain the data pipeline runs
  assert views.valid.sum() == 3


def test_raw_sar_goes_through_decibels(cfg):
  rng = np.random.default_rng(0)
  amplitude = rng.rayleigh(100.0, size=[40, 50, 2]).astype(np.float32)  # dual pol
  x = pp.preprocess(amplitude, "sar", cfg)
  db = 20 * np.log10(amplitude.astype(np.float64))
  lo, hi = np.percentile(db.reshape(-1, 2), cfg.sar_percentiles, axis=0)
  expected = np.clip((db - lo) / (hi - lo), 0, 1)
  np.testing.assert_allclose(x[..., :2], expected, atol=1e-5)
  np.testing.assert_allclose(x[..., 2], x[..., :2].mean(-1), atol=1e-6)
  # Intensity = amplitude**2 gives the same dB image, hence the same output.
  intensity_cfg = cfg.copy_and_resolve_references()
  intensity_cfg.sar_scale = "intensity"
  np.testing.assert_allclose(pp.preprocess(amplitude.astype(np.float64) ** 2, "sar",
                                           intensity_cfg), x, atol=1e-5)
  # Complex SLC: magnitude is the amplitude.
  phase = np.exp(1j * rng.uniform(0, 2 * np.pi, size=amplitude.shape))
  np.testing.assert_allclose(pp.preprocess(amplitude * phase, "sar", cfg), x, atol=1e-5)


def test_multiband_optical_band_choice(cfg):
  image = np.stack([np.full([4, 5], v, np.uint16) for v in range(6)], -1)
  image[0, 0] = 1000  # give every band a range
  pick = cfg.copy_and_resolve_references()
  pick.optical_bands = (5, 3, 1)
  x = pp.preprocess(image, "optical", pick)
  assert x.shape == (4, 5, 3)
  with pytest.raises(ValueError, match=r"optical_bands: \(5, 3, 7\)"):
    pick.optical_bands = (5, 3, 7)
    pp.preprocess(image, "optical", pick)


def _png16(array, color_type):
  h, w = array.shape[:2]
  raw = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_decode_16bit_and_multiband_tiff():
  grey = (np.arange(12).reshape(3, 4) * 5000).astype(np.uint16)
  np.testing.assert_array_equal(pp.decode_image(_png16(grey, 0)), grey[..., None])
  with pytest.raises(ValueError, match="16-bit PNG with colour type 2"):
    pp.decode_image(_png16(np.stack([grey] * 3, -1), 2))
  bands = np.random.default_rng(0).integers(0, 60000, size=[5, 6, 4]).astype(np.uint16)
  for planar in ("contig", "separate"):
    buf = io.BytesIO()
    tifffile.imwrite(buf, bands if planar == "contig" else np.moveaxis(bands, -1, 0),
                     planarconfig=planar, photometric="minisblack")
    np.testing.assert_array_equal(pp.decode_image(buf.getvalue()), bands)
  buf = io.BytesIO()
  tifffile.imwrite(buf, np.ones([5, 6], np.float32))
  out = pp.decode_image(buf.getvalue())
  assert out.shape == (5, 6, 1) and out.dtype == np.float32


@pytest.mark.parametrize("image,modality,message", [
    (np.zeros([0, 5, 3], np.uint8), "optical", "zero-size"),
    (np.array([[[np.nan]]], np.float32), "infrared", "non-finite"),
    (np.full([2, 2, 1], np.inf, np.float32), "sar", "non-finite"),
    (np.zeros([4, 4, 2], np.uint8), "optical", "band count 2"),
    (np.zeros([4, 4, 5], np.uint8), "sar", "channel count 5"),
    (np.zeros([4, 4, 2], np.uint8), "infrared", "channel count 2"),
    (np.zeros([4, 4, 3], bool), "optical", "dtype: unsupported bool"),
    (np.zeros([4, 4, 1], np.complex64), "infrared", "complex only for SAR"),
    (np.zeros([4, 4, 3], np.uint8), "hyperspectral", "modality: unknown value 'hyperspectral'"),
    (np.zeros([4, 4, 3, 2], np.uint8), "optical", "expected"),
    (-np.ones([4, 4, 1], np.float32), "sar", "negative amplitude"),
])
def test_bad_input_raises_naming_the_value(cfg, image, modality, message):
  with pytest.raises(ValueError, match=message):
    pp.preprocess(image, modality, cfg)


def test_bad_bytes():
  with pytest.raises(ValueError, match="empty"):
    pp.decode_image(b"")
  with pytest.raises(ValueError, match="cannot decode"):
    pp.decode_image(b"not an image at all")


def test_constant_band_maps_to_zero(cfg):
  x = pp.preprocess(np.full([3, 3], 7, np.uint16), "infrared", cfg)
  assert np.all(x == 0)
