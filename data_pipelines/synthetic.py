"""`synthetic_rs`: procedural multi-source remote-sensing scenes with exact targets.

Why: the project must train and be tested end to end on a fresh machine with no downloads.
Each scene has a land-cover class and several objects (ship, plane, storage tank, vehicle,
building) drawn as polygons, so boxes and masks are exact. The same scene geometry is rendered
as one of three sensors:

  * optical: colour textures per land cover, object colours, cast shadows;
  * SAR: per-class backscatter, bright point scatterers, radar shadow behind tall objects,
    multiplicative gamma speckle (L looks), log (dB) scaling to 8 bits, one band;
  * infrared: per-class temperature, hot spots, thermal blur, Gaussian and column (fixed
    pattern) sensor noise, one band.

Every task of `schema.TASKS` is asked with varied instruction templates and point / box /
polygon / scribble / mask prompts. Scenes hold distractors (several objects and classes) and
relations, so answers need the image, yet the vocabulary is small enough for the tiny preset.
Everything is a pure function of (seed, modality, split, index): records can be generated in
any order and in parallel, and two machines produce the same bytes.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_pipelines import schema
from earthgptx_jax import template

LAND_COVER: tuple[str, ...] = ("water", "forest", "farmland", "desert", "urban", "grassland")
OBJECT_CLASSES: tuple[str, ...] = ("ship", "plane", "storage tank", "vehicle", "building")
SPLITS: tuple[str, ...] = ("train", "validation")

# Rendering constants per class: optical RGB, SAR backscatter (linear), infrared temperature
# (0..1). Objects: (optical RGB, SAR backscatter, temperature, casts a shadow).
_SCENE_LOOK = {
    "water": ((0.10, 0.25, 0.45), 0.02, 0.30),
    "forest": ((0.10, 0.33, 0.12), 0.30, 0.42),
    "farmland": ((0.52, 0.58, 0.26), 0.14, 0.52),
    "desert": ((0.80, 0.70, 0.46), 0.06, 0.72),
    "urban": ((0.50, 0.50, 0.52), 0.45, 0.62),
    "grassland": ((0.35, 0.55, 0.25), 0.11, 0.47),
}
_OBJECT_LOOK = {
    "ship": ((0.92, 0.92, 0.88), 3.0, 0.82, False),
    "plane": ((0.84, 0.85, 0.90), 2.0, 0.62, True),
    "storage tank": ((0.96, 0.96, 0.96), 2.5, 0.76, True),
    "vehicle": ((0.85, 0.15, 0.10), 3.5, 0.97, False),
    "building": ((0.68, 0.30, 0.24), 1.5, 0.68, True),
}
_POSITIONS = (("top left", "top", "top right"), ("left", "center", "right"),
              ("bottom left", "bottom", "bottom right"))

_INSTRUCTIONS = {
    "scene_classification": ("What kind of scene is this?", "Classify the land cover of this "
                             "image.", "Which scene category does this image belong to?"),
    "image_caption": ("Describe the image briefly.", "Write a short caption for this image.",
                      "What does this image show?"),
    "vqa_count": ("How many {plural} are there?", "Count the {plural} in the image.",
                  "What is the number of {plural}?"),
    "vqa_exist": ("Is there a {name} in the image?", "Does the image contain a {name}?"),
    "referring_classification": ("What is the object in <vp1>?", "Which class is <vp1>?",
                                 "Identify the object marked by <vp1>."),
    "region_caption": ("Describe the region <vp1>.", "Give a short description of <vp1>.",
                       "What can you say about <vp1>?"),
    "relation_reasoning": ("What is the relation between <vp1> and <vp2>?", "Where is <vp1> "
                           "relative to <vp2>?", "Describe the spatial relation of <vp1> "
                           "and <vp2>."),
    "box_grounding": ("Where is the {name}? Answer with a box.", "Locate the {name}.",
                      "Give the bounding box of the {name}."),
    "referring_segmentation": ("Segment the {name}.", "Please give the mask of the {name}.",
                               "Can you segment the {name} in this image?"),
    "prompt_segmentation": ("Segment the object in <vp1>.", "Give the mask of <vp1>."),
}


@dataclasses.dataclass(frozen=True)
class SceneObject:
  cls: str
  polygon: np.ndarray  # [N, 2] (x, y) original pixels
  mask: np.ndarray  # [H, W] bool
  box: tuple[float, float, float, float]  # tight pixel-edge box of `mask`


@dataclasses.dataclass(frozen=True)
class Scene:
  land_cover: str
  height: int
  width: int
  objects: tuple[SceneObject, ...]


def check_config(cfg) -> None:
  """Raises a ValueError naming the `data.synthetic` field whose value cannot work."""
  if not 1 <= cfg.num_land_cover <= len(LAND_COVER):
    raise ValueError(f"data.synthetic.num_land_cover: {cfg.num_land_cover} not in "
                     f"1..{len(LAND_COVER)}")
  if not 1 <= cfg.num_object_classes <= len(OBJECT_CLASSES):
    raise ValueError(f"data.synthetic.num_object_classes: {cfg.num_object_classes} not in "
                     f"1..{len(OBJECT_CLASSES)}")
  if not 32 <= cfg.min_size <= cfg.max_size:
    raise ValueError(f"data.synthetic sizes: need 32 <= min_size <= max_size, got "
                     f"{cfg.min_size}, {cfg.max_size}")
  if cfg.max_objects < 2:
    raise ValueError(f"data.synthetic.max_objects: need >= 2 (relations), got "
                     f"{cfg.max_objects}")


# ----------------------------------------------------------------------------------------------
# Geometry.


def _object_polygon(cls: str, rng: np.random.Generator, unit: float) -> np.ndarray:
  """An object outline centred at the origin: [N, 2], in pixels."""
  if cls == "ship":
    length = rng.uniform(14, 22) * unit
    width = length / rng.uniform(3.0, 4.0)
    pts = [(-length / 2, -width / 2), (length / 4, -width / 2), (length / 2, 0),
           (length / 4, width / 2), (-length / 2, width / 2)]
  elif cls == "plane":
    length = rng.uniform(14, 20) * unit
    f, s = length * 0.09, length * 0.45  # half fuselage width, half wing span
    w, t, ts = length * 0.12, -length * 0.38, length * 0.2  # wing half chord, tail x, tail span
    pts = [(length / 2, 0), (f * 1.5, -f), (w, -s), (-w, -s), (-f, -f), (t, -f), (t - f, -ts),
           (-length / 2, -ts), (-length / 2, ts), (t - f, ts), (t, f), (-f, f), (-w, s),
           (w, s), (f * 1.5, f)]
  elif cls == "storage tank":
    r = rng.uniform(4, 7) * unit
    a = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    return np.stack([r * np.cos(a), r * np.sin(a)], -1)
  elif cls == "vehicle":
    length = rng.uniform(6, 9) * unit
    pts = [(-length / 2, -length / 4), (length / 2, -length / 4), (length / 2, length / 4),
           (-length / 2, length / 4)]
  elif cls == "building":
    a, b = rng.uniform(10, 16) * unit / 2, rng.uniform(8, 14) * unit / 2
    if rng.random() < 0.5:  # L-shaped block
      pts = [(-a, -b), (a, -b), (a, 0), (0, 0), (0, b), (-a, b)]
    else:
      pts = [(-a, -b), (a, -b), (a, b), (-a, b)]
  else:
    raise ValueError(f"object class: unknown value {cls!r}; expected one of {OBJECT_CLASSES}")
  pts = np.asarray(pts, np.float64)
  theta = rng.uniform(0, np.pi) if cls != "building" else rng.uniform(-0.3, 0.3)
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  return pts @ rot.T


def _fill_polygon(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
  img = Image.new("L", (width, height), 0)
  ImageDraw.Draw(img).polygon([tuple(p) for p in polygon.tolist()], fill=1)
  return np.asarray(img, bool)


def make_scene(rng: np.random.Generator, cfg) -> Scene:
  """A land-cover class and 1..max_objects non-overlapping objects with exact masks."""
  height = int(rng.integers(cfg.min_size, cfg.max_size + 1))
  width = int(rng.integers(cfg.min_size, cfg.max_size + 1))
  unit = min(height, width) / 96.0
  land = LAND_COVER[int(rng.integers(cfg.num_land_cover))]
  classes = OBJECT_CLASSES[:cfg.num_object_classes]
  objects: list[SceneObject] = []
  taken: list[tuple[float, float, float, float]] = []
  for _ in range(int(rng.integers(1, cfg.max_objects + 1))):
    cls = classes[int(rng.integers(len(classes)))]
    shape = _object_polygon(cls, rng, unit)
    lo, hi = shape.min(0), shape.max(0)
    for _ in range(30):  # Rejection sampling of a free spot with a 2 px margin.
      cx = rng.uniform(1 - lo[0], width - 1 - hi[0])
      cy = rng.uniform(1 - lo[1], height - 1 - hi[1])
      bx = (cx + lo[0] - 2, cy + lo[1] - 2, cx + hi[0] + 2, cy + hi[1] + 2)
      if all(bx[2] < t[0] or t[2] < bx[0] or bx[3] < t[1] or t[3] < bx[1] for t in taken):
        break
    else:
      continue
    polygon = (shape + [cx, cy]).astype(np.float32)
    mask = _fill_polygon(polygon, height, width)
    if mask.sum() < 4:
      continue
    taken.append(bx)
    objects.append(SceneObject(cls, polygon, mask, schema.mask_to_box(mask)))
  if not objects:  # A crowded draw: one object in the middle, always fits.
    shape = _object_polygon(classes[0], rng, unit)
    polygon = (shape + [width / 2, height / 2]).astype(np.float32)
    mask = _fill_polygon(polygon, height, width)
    objects.append(SceneObject(classes[0], polygon, mask, schema.mask_to_box(mask)))
  return Scene(land, height, width, tuple(objects))


# ----------------------------------------------------------------------------------------------
# Rendering.


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
  """Band-limited noise in ~[-1, 1]: uniform noise on a coarse grid, bicubic upsampled."""
  gh, gw = max(2, height // cell + 2), max(2, width // cell + 2)
  coarse = rng.uniform(0, 255, (gh, gw)).astype(np.uint8)
  fine = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
  return np.asarray(fine, np.float32) / 127.5 - 1.0


def _scene_pattern(rng: np.random.Generator, land: str, height: int, width: int) -> np.ndarray:
  """Land-cover structure in ~[-1, 1]: stripes for fields, grid for urban, dunes, blotches."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  angle = rng.uniform(0, np.pi)
  u = xx * np.cos(angle) + yy * np.sin(angle)
  if land == "farmland":
    return np.sign(np.sin(u / rng.uniform(3, 6))) * 0.6 + 0.4 * _smooth_noise(rng, height,
                                                                              width, 16)
  if land == "urban":
    period = rng.uniform(10, 16)
    grid = (np.mod(xx, period) < 2) | (np.mod(yy, period) < 2)
    return np.where(grid, -0.8, 0.3) + 0.3 * _smooth_noise(rng, height, width, 4)
  if land == "desert":
    return 0.7 * np.sin(u / rng.uniform(6, 10) + 2 * _smooth_noise(rng, height, width, 24))
  if land == "forest":
    return 0.9 * _smooth_noise(rng, height, width, 3)
  return 0.5 * _smooth_noise(rng, height, width, 20)  # water, grassland: smooth


def _shadow(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
  shifted = np.zeros_like(mask)
  h, w = mask.shape
  shifted[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      mask[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
  return shifted & ~mask


def render_optical(scene: Scene, rng: np.random.Generator) -> np.ndarray:
  """[H, W, 3] uint8."""
  h, w = scene.height, scene.width
  colour, _, _ = _SCENE_LOOK[scene.land_cover]
  pattern = _scene_pattern(rng, scene.land_cover, h, w)
  img = np.asarray(colour, np.float32) * (1 + 0.25 * pattern[..., None])
  img *= 1 + 0.05 * rng.standard_normal((h, w, 1)).astype(np.float32)
  for obj in scene.objects:
    obj_colour, _, _, casts_shadow = _OBJECT_LOOK[obj.cls]
    if casts_shadow:
      img[_shadow(obj.mask, 2, 2)] *= 0.45
    if obj.cls == "vehicle":  # Cars come in many colours.
      obj_colour = tuple(rng.uniform(0.2, 1.0, 3))
    shade = 1 + 0.08 * _smooth_noise(rng, h, w, 4)[obj.mask][:, None]
    img[obj.mask] = np.asarray(obj_colour, np.float32) * shade
  return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def render_sar(scene: Scene, rng: np.random.Generator) -> np.ndarray:
  """[H, W] uint8: 8-bit dB-scaled intensity with speckle, scatterers and radar shadow."""
  h, w = scene.height, scene.width
  _, sigma0, _ = _SCENE_LOOK[scene.land_cover]
  pattern = _scene_pattern(rng, scene.land_cover, h, w)
  sigma = sigma0 * np.exp(0.6 * pattern)
  for obj in scene.objects:
    _, backscatter, _, tall = _OBJECT_LOOK[obj.cls]
    if tall:  # Radar looks from the left: shadow falls to the right (range direction).
      sigma[_shadow(obj.mask, max(2, int(0.4 * (obj.box[2] - obj.box[0]))), 0)] *= 0.05
    sigma[obj.mask] = backscatter
    ys, xs = np.nonzero(obj.mask)
    pick = rng.integers(len(xs), size=min(len(xs), 3))
    sigma[ys[pick], xs[pick]] = backscatter * 8  # Dihedral / trihedral bright scatterers.
  looks = int(rng.integers(1, 5))
  speckle = rng.gamma(looks, 1.0 / looks, (h, w))
  db = 10 * np.log10(np.maximum(sigma * speckle, 1e-4))
  return (np.clip((db + 25) / 35, 0, 1) * 255).round().astype(np.uint8)


def render_infrared(scene: Scene, rng: np.random.Generator) -> np.ndarray:
  """[H, W] uint8: temperature map, blurred, with Gaussian and column sensor noise."""
  h, w = scene.height, scene.width
  _, _, temp0 = _SCENE_LOOK[scene.land_cover]
  temp = temp0 + 0.06 * _scene_pattern(rng, scene.land_cover, h, w)
  for obj in scene.objects:
    _, _, t, _ = _OBJECT_LOOK[obj.cls]
    temp[obj.mask] = t
    if obj.cls in ("plane", "ship"):  # Engines are hot spots.
      x1, y1, x2, y2 = obj.box
      cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
      temp[max(cy - 1, 0):cy + 1, max(cx - 1, 0):cx + 1] = 1.0
  img = Image.fromarray((np.clip(temp, 0, 1) * 255).astype(np.uint8))
  temp = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), np.float32) / 255
  temp += 0.025 * rng.standard_normal((h, w)) + 0.02 * rng.standard_normal((1, w))
  return (np.clip(temp, 0, 1) * 255).round().astype(np.uint8)


_RENDERERS = {"optical": render_optical, "sar": render_sar, "infrared": render_infrared}


def encode_png(pixels: np.ndarray) -> bytes:
  """Lossless and fast: noisy sensor images barely compress, so zlib level 1 is ~2.5x faster
  than PIL's default 6 for about the same size (measured at paper sizes)."""
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Tasks.


def _plural(cls: str) -> str:
  return cls + "s"


def _position(obj: SceneObject, scene: Scene) -> str:
  x1, y1, x2, y2 = obj.box
  col = min(int((x1 + x2) / 2 / scene.width * 3), 2)
  row = min(int((y1 + y2) / 2 / scene.height * 3), 2)
  return _POSITIONS[row][col]


def _size_word(obj: SceneObject, scene: Scene) -> str:
  unit = min(scene.height, scene.width) / 96.0
  typical = {"ship": 60, "plane": 70, "storage tank": 95, "vehicle": 12, "building": 120}
  return "large" if obj.mask.sum() > typical[obj.cls] * unit**2 else "small"


def _relation(a: SceneObject, b: SceneObject) -> str:
  ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
  bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
  if abs(ax - bx) >= abs(ay - by):
    return "left of" if ax < bx else "right of"
  return "above" if ay < by else "below"


def _caption(scene: Scene) -> str:
  counts = [(c, sum(o.cls == c for o in scene.objects)) for c in OBJECT_CLASSES]
  parts = [f"{n} {_plural(c) if n > 1 else c}" for c, n in counts if n]
  listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  return f"{scene.land_cover} with {listed}"


def _prompt_for(obj: SceneObject, rng: np.random.Generator, scene: Scene) -> schema.VisualPrompt:
  kind = schema.PROMPT_KINDS[int(rng.integers(len(schema.PROMPT_KINDS)))]
  ys, xs = np.nonzero(obj.mask)
  if kind == "point":
    i = int(rng.integers(len(xs)))
    return schema.point_prompt(xs[i] + 0.5, ys[i] + 0.5)
  if kind == "box":
    jitter = rng.uniform(-1, 1, 4)
    x1, y1, x2, y2 = np.asarray(obj.box) + jitter
    return schema.box_prompt((max(x1, 0), max(y1, 0), min(max(x2, x1 + 1), scene.width),
                              min(max(y2, y1 + 1), scene.height)))
  if kind == "polygon":
    return schema.VisualPrompt("polygon", obj.polygon.copy())
  if kind == "scribble":
    pick = rng.choice(len(xs), size=min(len(xs), int(rng.integers(2, 5))), replace=False)
    pts = np.stack([xs[pick] + 0.5, ys[pick] + 0.5], -1)
    centred = pts - pts.mean(0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0] if len(pts) > 1 else np.ones(2)
    return schema.VisualPrompt("scribble", pts[np.argsort(centred @ axis)].astype(np.float32))
  return schema.VisualPrompt("mask", np.zeros((0, 2), np.float32), schema.encode_mask(obj.mask))


def _possible_tasks(scene: Scene) -> list[str]:
  counts = {c: sum(o.cls == c for o in scene.objects) for c in OBJECT_CLASSES}
  tasks = ["scene_classification", "image_caption", "vqa", "referring_classification",
           "region_caption", "referring_segmentation"]
  if len(scene.objects) >= 2:
    tasks.append("relation_reasoning")
  if any(n == 1 for n in counts.values()):
    tasks.append("box_grounding")
  return [t for t in schema.TASKS if t in tasks]


def make_conversation(scene: Scene, task: str, rng: np.random.Generator, cfg):
  """(question, answer, prompts, masks) for `task` about `scene`."""
  def pick(key: str) -> str:
    options = _INSTRUCTIONS[key]
    return options[int(rng.integers(len(options)))]

  classes = OBJECT_CLASSES[:cfg.num_object_classes]
  counts = {c: sum(o.cls == c for o in scene.objects) for c in classes}
  unique = [o for o in scene.objects if counts[o.cls] == 1]
  obj = scene.objects[int(rng.integers(len(scene.objects)))]
  if task == "scene_classification":
    return pick(task), scene.land_cover, (), ()
  if task == "image_caption":
    return pick(task), _caption(scene), (), ()
  if task == "vqa":
    cls = classes[int(rng.integers(len(classes)))]
    if rng.random() < 0.5:
      return pick("vqa_count").format(plural=_plural(cls)), str(counts[cls]), (), ()
    return pick("vqa_exist").format(name=cls), "yes" if counts[cls] else "no", (), ()
  if task == "referring_classification":
    return pick(task), obj.cls, (_prompt_for(obj, rng, scene),), ()
  if task == "region_caption":
    answer = f"{_size_word(obj, scene)} {obj.cls} in the {_position(obj, scene)}"
    return pick(task), answer, (_prompt_for(obj, rng, scene),), ()
  if task == "relation_reasoning":
    i, j = rng.choice(len(scene.objects), size=2, replace=False)
    a, b = scene.objects[i], scene.objects[j]
    answer = f"the {a.cls} is {_relation(a, b)} the {b.cls}"
    return pick(task), answer, (_prompt_for(a, rng, scene), _prompt_for(b, rng, scene)), ()
  if task == "box_grounding":
    target = unique[int(rng.integers(len(unique)))]
    answer = template.format_box(target.box, scene.width, scene.height)
    return pick(task).format(name=target.cls), answer, (), ()
  if task == "referring_segmentation":
    mask = (schema.encode_mask(obj.mask),)
    if counts[obj.cls] == 1 and rng.random() < 0.5:
      return pick(task).format(name=obj.cls), template.SEG, (), mask
    return pick("prompt_segmentation"), template.SEG, (_prompt_for(obj, rng, scene),), mask
  raise ValueError(f"task: unknown value {task!r}; expected one of {schema.TASKS}")


def make_record(modality: str, split: str, index: int, cfg) -> schema.Record:
  """The `index`-th record of `split` for `modality`: a pure function of its arguments."""
  check_config(cfg)
  if modality not in schema.MODALITIES:
    raise ValueError(f"modality: unknown value {modality!r}; expected one of "
                     f"{schema.MODALITIES}")
  if split not in SPLITS:
    raise ValueError(f"split: unknown value {split!r}; expected one of {SPLITS}")
  rng = np.random.default_rng([cfg.seed, schema.MODALITIES.index(modality),
                               SPLITS.index(split), index])
  task = schema.TASKS[int(rng.integers(len(schema.TASKS)))]
  scene = make_scene(rng, cfg)
  while task not in _possible_tasks(scene):  # Tasks stay uniform; rare redraws.
    scene = make_scene(rng, cfg)
  question, answer, prompts, masks = make_conversation(scene, task, rng, cfg)
  pixels = _RENDERERS[modality](scene, rng)
  return schema.Record(
      id=f"synthetic_rs-{modality}-{split}-{index:07d}", image=encode_png(pixels),
      modality=modality, source=f"synthetic_rs_{modality}", task=task,
      turns=(f"{template.IMAGE_PLACEHOLDER}\n{question}", answer), prompts=tuple(prompts),
      masks=tuple(masks))


def num_records(split: str, cfg) -> int:
  return {"train": cfg.num_train, "validation": cfg.num_eval}[split]

