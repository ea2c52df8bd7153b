"""Decoding and per-modality preprocessing: any sensor's pixels -> float32 [H, W, 3] in [0, 1].

The encoders were pretrained on 8-bit RGB photographs, so every modality is brought to three
channels in [0, 1] by one documented rule; each encoder then applies its own mean / std inside
the model. One function per modality, selected by the record's modality (`template.MODALITIES`):

  optical   uint8: x / 255. Other dtypes (16-bit, float reflectance, ...): per-band percentile
            stretch. 1 band -> grey replicated; >= 3 bands -> `cfg.optical_bands` (R, G, B).
  sar       Amplitude / intensity, 8/16-bit, float or complex (SLC: magnitude). Raw values
            (anything but uint8, which is display-scaled already) go to dB by `cfg.sar_scale`
            (amplitude: 20 log10, intensity: 10 log10, db: as is). Then per-channel percentile
            clip to [0, 1]. Channels: 1 (single pol) -> (p, p, p); 2 (co, cross) ->
            (co, cross, mean(co, cross)); 3 -> kept (e.g. HH, HV, VV or a grey rendering);
            4 (HH, HV, VH, VV) -> (HH, mean(HV, VH), VV).
  infrared  8/16-bit or float, 1 band or a 3-band rendering of a grey image (averaged):
            percentile normalisation, grey replicated.

Percentile stretch: values clipped to the (low, high) percentiles and mapped linearly onto
[0, 1]; a constant band maps to 0. Bad input raises ValueError naming the field and value.
"""

from __future__ import annotations

import io
import struct

import ml_collections
import numpy as np
import tifffile
from PIL import Image

from earthgptx_jax import template

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def decode_image(data: bytes) -> np.ndarray:
  """Encoded PNG / JPEG / TIFF (or any PIL format) -> [H, W, C] in the file's own dtype.

  Bands are last; alpha is dropped (it is not sensor data); palette images are expanded to
  RGB; 16-bit grey PNGs stay uint16; TIFFs keep every band and dtype (planar layouts are
  moved to bands-last).
  """
  if not data:
    raise ValueError("image bytes: empty")
  if data[:4] in _TIFF_MAGIC:
    return _decode_tiff(data)
  if data[:8] == _PNG_MAGIC and len(data) >= 26:
    bit_depth, color_type = struct.unpack(">BB", data[24:26])
    if bit_depth == 16 and color_type in (2, 4, 6):
      raise ValueError(f"image bytes: 16-bit PNG with colour type {color_type} (multi-band) "
                       f"is not supported (PIL would truncate it to 8 bits); store it as TIFF")
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as e:  # PIL raises several unrelated types.
    raise ValueError(f"image bytes: cannot decode {data[:8]!r}...: {e}") from None
  mode = image.mode
  if mode == "P":
    image = image.convert("RGB")
  elif mode == "PA":
    image = image.convert("RGBA")
  elif mode == "1":
    image = image.convert("L")
  elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
    image = image.convert("RGB")
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if image.mode in ("RGBA", "LA", "La", "RGBa"):
    array = array[..., :-1]
  return _check_decoded(array)


def _decode_tiff(data: bytes) -> np.ndarray:
  try:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
      series = tif.series[0]
      array, axes = series.asarray(), series.axes
  except Exception as e:  # a truncated header raises struct.error, IndexError, TiffFileError...
    raise ValueError(f"image bytes: cannot decode TIFF {data[:8]!r}...: "
                     f"{type(e).__name__}: {e}") from None
  if axes == "YX":
    array = array[..., None]
  elif axes in ("SYX", "CYX", "IYX", "QYX"):
    array = np.moveaxis(array, 0, -1)
  elif axes not in ("YXS", "YXC"):
    raise ValueError(f"TIFF axes: unsupported layout {axes!r} (shape {array.shape}); expected "
                     f"YX, YXS or a band-first stack")
  return _check_decoded(array)


def _check_decoded(array: np.ndarray) -> np.ndarray:
  if array.ndim != 3 or 0 in array.shape:
    raise ValueError(f"image: decoded to an empty or malformed array of shape {array.shape}")
  return np.ascontiguousarray(array)


def preprocess(image: np.ndarray, modality: str, cfg: ml_collections.ConfigDict) -> np.ndarray:
  """image: [H, W] or [H, W, C] in any supported dtype -> float32 [H, W, 3] in [0, 1]."""
  if modality not in _BY_MODALITY:
    raise ValueError(f"modality: unknown value {modality!r}; expected one of "
                     f"{template.MODALITIES}")
  image = _validate(image, allow_complex=modality == "sar")
  out = _BY_MODALITY[modality](image, cfg)
  return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def preprocess_optical(image: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
  bands = image.shape[-1]
  if bands == 1:
    image = np.repeat(image, 3, axis=-1)
  elif bands >= 3:
    chosen = tuple(int(b) for b in cfg.optical_bands)
    if len(chosen) != 3 or any(not 0 <= b < bands for b in chosen):
      raise ValueError(f"optical_bands: {chosen} does not pick 3 of the image's {bands} bands")
    image = image[..., list(chosen)]
  else:
    raise ValueError(f"optical image: unsupported band count {bands}; expected 1 or >= 3 "
                     f"(pick RGB with optical_bands)")
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return _percentile_stretch(image.astype(np.float32), cfg.optical_percentiles)


def preprocess_sar(image: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
  bands = image.shape[-1]
  if bands not in (1, 2, 3, 4):
    raise ValueError(f"SAR image: unsupported channel count {bands}; expected 1 (single pol), "
                     f"2 (dual pol), 3 or 4 (quad pol)")
  if image.dtype != np.uint8:
    image = _to_db(image, cfg.sar_scale)
  x = _percentile_stretch(image.astype(np.float32), cfg.sar_percentiles)
  if bands == 1:
    return np.repeat(x, 3, axis=-1)
  if bands == 2:
    return np.concatenate([x, x.mean(-1, keepdims=True)], axis=-1)
  if bands == 4:
    return np.stack([x[..., 0], (x[..., 1] + x[..., 2]) / 2, x[..., 3]], axis=-1)
  return x


def preprocess_infrared(image: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
  bands = image.shape[-1]
  if bands not in (1, 3):
    raise ValueError(f"infrared image: unsupported channel count {bands}; expected 1 or 3 "
                     f"(a grey rendering)")
  grey = image.astype(np.float32).mean(-1, keepdims=True)
  return np.repeat(_percentile_stretch(grey, cfg.infrared_percentiles), 3, axis=-1)


_BY_MODALITY = {"optical": preprocess_optical, "sar": preprocess_sar,
                "infrared": preprocess_infrared}
assert tuple(_BY_MODALITY) == template.MODALITIES


def _validate(image: np.ndarray, *, allow_complex: bool) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3:
    raise ValueError(f"image: expected [H, W] or [H, W, C], got shape {image.shape}")
  if 0 in image.shape:
    raise ValueError(f"image: zero-size shape {image.shape}")
  kind = image.dtype.kind
  if kind == "c" and allow_complex:
    image = np.abs(image)  # SLC: amplitude
  elif kind not in "uif":
    raise ValueError(f"image dtype: unsupported {image.dtype}; expected unsigned/signed "
                     f"integers or floats" + (" (complex only for SAR)" if kind == "c" else ""))
  if kind in "fc":
    bad = ~np.isfinite(image)
    if bad.any():
      raise ValueError(f"image: {int(bad.sum())} non-finite (NaN/inf) pixels, first at "
                       f"{tuple(int(i) for i in np.argwhere(bad)[0])}")
  return image


def _to_db(image: np.ndarray, scale: str) -> np.ndarray:
  x = image.astype(np.float64)
  if scale == "db":
    return x
  if scale not in ("amplitude", "intensity"):
    raise ValueError(f"sar_scale: unknown value {scale!r}; expected amplitude, intensity or db")
  if np.any(x < 0):
    raise ValueError(f"SAR image: negative {scale} values (min {x.min()}); set sar_scale='db' "
                     f"if the data are already in decibels")
  tiny = np.finfo(np.float32).tiny
  return (20.0 if scale == "amplitude" else 10.0) * np.log10(np.maximum(x, tiny))


def _percentile_stretch(x: np.ndarray, percentiles) -> np.ndarray:
  """Per-band clip to the (low, high) percentiles and linear map onto [0, 1]."""
  low, high = (float(p) for p in percentiles)
  if not 0.0 <= low < high <= 100.0:
    raise ValueError(f"percentiles: expected 0 <= low < high <= 100, got {tuple(percentiles)}")
  flat = x.reshape(-1, x.shape[-1])
  lo, hi = np.percentile(flat, [low, high], axis=0).astype(np.float32)
  span = hi - lo
  out = (x - lo) / np.where(span > 0, span, 1.0)
  return np.where(span > 0, np.clip(out, 0.0, 1.0), 0.0).astype(np.float32)
