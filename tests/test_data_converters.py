"""Converters on the real samples in ../shared/data (original formats) and on small fixtures
written in the documented formats of datasets not available offline."""

import io
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from data_pipelines import builders, schema
from data_pipelines.converters import (captions, common, dior_rsvg, dota, hit_uav, hrsid, mstar,
                                       nwpu_captions, rsicd, rsvqa, scene_folder, sirst, ssdd,
                                       ucm_captions)
from earthgptx_jax import template


def _size(record):
  return Image.open(io.BytesIO(record.image)).size


def _valid(records):
  for r in records:
    schema.validate(r, *_size(r))
  return records


def _boxes(record):
  return template.parse_coordinates(record.turns[1], *_size(record)).boxes


def _close(parsed, expected, width, height):
  """Text boxes are quantised to 1/1000 of the side: each true box has a parsed box within
  one bin, one to one."""
  tol = np.array([width, height, width, height]) / template.COORD_BINS + 1e-6
  got = [np.asarray(b) for b in parsed]
  assert len(got) == len(expected)
  for box in expected:
    hits = [i for i, g in enumerate(got) if (np.abs(g - np.asarray(box)) < tol).all()]
    assert hits, f"no parsed box within one bin of {box}: {parsed}"
    got.pop(hits[0])


def test_dior_rsvg_grounds_the_referring_expression(shared_data):
  (record,) = _valid(list(dior_rsvg.records(shared_data / "DIOR-RSVG_sample/RSVGD", "test")))
  assert record.turns[0].endswith("Where is a green and brown golf field? Answer with a box.")
  _close(_boxes(record), [(133, 237, 684, 672)], 800, 800)
  assert record.task == "box_grounding" and record.modality == "optical"
  assert not list(dior_rsvg.records(shared_data / "DIOR-RSVG_sample/RSVGD", "train"))


def test_sirst_masks_and_boxes(shared_data, tmp_path):
  root = shared_data / "SIRST"
  records = _valid(list(sirst.records(root, "test")))
  assert len(records) > 50
  for r in records[:20]:
    sid = r.id.split("-")[1]
    mask = np.asarray(Image.open(root / "masks" / f"{sid}_pixels0.png").convert("L")) > 0
    if r.task == "referring_segmentation":
      np.testing.assert_array_equal(schema.decode_mask(r.masks[0], *_size(r)), mask)
    else:
      _close(_boxes(r), sirst.target_boxes(mask), *_size(r))
  # Known quirk: a mask whose size disagrees with its image is skipped, not converted.
  for sub in ("images", "masks", "idx_427"):
    (tmp_path / sub).mkdir()
  Image.new("L", (40, 30)).save(tmp_path / "images" / "a.png")
  Image.new("L", (30, 30), 255).save(tmp_path / "masks" / "a_pixels0.png")
  (tmp_path / "idx_427" / "test.txt").write_text("a\n")
  assert not list(sirst.records(tmp_path, "test"))


def test_sirst_answers_name_every_target(shared_data):
  """Masks with k separate targets (14 of the 99 sample images; the XML has one box spanning
  them all) get k answer boxes, one on each target, and plural phrasing."""
  from scipy import ndimage
  root = shared_data / "SIRST"
  records = _valid([*sirst.records(root, "validation"), *sirst.records(root, "test")])
  by_image = {}
  for r in records:
    by_image.setdefault(r.id.split("-")[1], {})[r.task] = r
  several = 0
  for sid, tasks in by_image.items():
    mask = np.asarray(Image.open(root / "masks" / f"{sid}_pixels0.png").convert("L")) > 0
    labels, k = ndimage.label(mask, structure=np.ones((3, 3)))
    boxes = _boxes(tasks["box_grounding"])
    assert len(boxes) == k, (sid, k, boxes)
    hit = set()
    for x1, y1, x2, y2 in boxes:  # each box covers (most of) its own target
      inside = labels[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))]
      target = np.bincount(inside.ravel(), minlength=k + 1)[1:].argmax() + 1
      assert (inside == target).sum() >= 0.8 * (labels == target).sum(), (sid, target)
      hit.add(target)
    assert hit == set(range(1, k + 1)), sid
    question = tasks["box_grounding"].turns[0]
    segment = tasks["referring_segmentation"].turns[0]
    if k == 1:
      assert question.endswith("Where is the small target? Answer with a box.")
      assert segment.endswith("Segment the small target.")
    else:
      several += 1
      assert question.endswith("Locate every small target. Answer with boxes.")
      assert segment.endswith("Segment the small targets.")
  assert len(by_image) == 99 and several == 14


def test_hrsid_instance_masks_agree_with_the_colour_mask(shared_data):
  data = shared_data / "HRSID_official_samples" / "data"
  records = _valid([*hrsid.records(data.parent, "train"), *hrsid.records(data.parent, "test")])
  chips = {r.id.split("-")[1] for r in records}
  assert len(chips) == 4
  for r in records:
    chip = r.id.split("-")[1]
    ids = np.asarray(Image.open(data / f"{chip}_instance_id_RGB.png").convert("RGB"))
    colour = np.asarray(Image.open(data / f"{chip}_instance_color_RGB.png").convert("RGB"))
    ships = (colour == (128, 0, 0)).all(-1)
    masks = hrsid.instance_masks(ids)
    if r.task == "vqa":
      assert r.turns[1] == str(len(masks))
    if r.task == "referring_segmentation":
      got = schema.decode_mask(r.masks[0], *_size(r))
      assert (got == ships).mean() > 0.999  # two independent files of the release
    if r.task == "box_grounding":
      _close(_boxes(r), [schema.mask_to_box(m) for m in masks], *_size(r))


def test_hrsid_coco_layout(tmp_path):
  (tmp_path / "annotations").mkdir()
  (tmp_path / "JPEGImages").mkdir()
  Image.new("L", (64, 48)).save(tmp_path / "JPEGImages" / "c.jpg")
  coco = {"images": [{"id": 1, "file_name": "c.jpg", "width": 64, "height": 48}],
          "annotations": [{"image_id": 1, "bbox": [10, 5, 20, 10], "category_id": 1,
                           "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]}]}
  (tmp_path / "annotations" / "train2017.json").write_text(json.dumps(coco))
  records = _valid(list(hrsid.records(tmp_path, "train")))
  assert [r.task for r in records] == ["vqa", "referring_segmentation", "box_grounding"]
  mask = schema.decode_mask(records[1].masks[0], 64, 48)
  assert schema.mask_to_box(mask) == (10, 5, 30, 15)
  _close(_boxes(records[2]), [(10, 5, 30, 15)], 64, 48)


def test_hit_uav_voc_matches_its_json_and_counts(shared_data):
  root = shared_data / "HIT-UAV"
  records = _valid(list(hit_uav.records(root, "test")))
  from_json = hit_uav.read_json(root / "normal_json" / "annotations" / "test.json")
  checked = 0
  for stem in sorted({r.id.split("-")[1] for r in records})[:15]:
    voc = common.read_voc(root / "normal_xml" / "Annotations" / f"{stem}.xml")
    want = sorted((o.name, o.box) for o in voc.objects)
    assert sorted((b.name, b.box) for b in from_json[f"{stem}.jpg"]) == want
    for r in records:
      if r.id.startswith(f"hit_uav-{stem}-count-"):
        name = r.id.rsplit("-", 1)[1]
        assert r.turns[1] == str(sum(o.name == name for o in voc.objects))
        checked += 1
  assert checked >= 15
  assert {r.modality for r in records} == {"infrared"}
  assert hit_uav.class_phrase("OtherVehicle") == "other vehicle"


def test_dota_counts_every_object_and_skips_headers(shared_data):
  root = shared_data / "DOTA_devkit_example" / "example"
  records = _valid(list(dota.records(root, "train")))
  objects = dota.parse_label_file(root / "labelTxt" / "P0706.txt")
  assert len(objects) == 536
  counts = {r.id.split("count-")[1]: int(r.turns[1]) for r in records
            if r.id.startswith("dota-P0706-count-")}
  assert sum(counts.values()) == 536 and counts["ship"] > 500
  assert all(len(_boxes(r)) <= schema.MAX_ANSWER_BOXES
             for r in records if r.task == "box_grounding")


def test_rsicd_captions_and_mstar_classes(shared_data):
  records = _valid(list(rsicd.records(shared_data / "RSICD_captions_sample", "test")))
  images = os.listdir(shared_data / "RSICD_captions_sample/src/datasets/RSICD/raw_dataset/"
                      "RSICD_images")
  assert len(records) == 5 * len(images)
  assert not any("<start_seq>" in r.turns[1] or "<end_seq>" in r.turns[1] for r in records)
  assert captions.clean("<start_seq> a ship , near a port . <end_seq>") == "a ship, near a port."
  root = shared_data / "MSTAR_hunterlew/classification/caffe/data/mstar"
  val = _valid(list(mstar.records(root, "validation")))
  assert len(val) == 50
  for r in val:
    folder = int(r.id.split("-")[2].split("_")[0])
    assert r.turns[1] == mstar.CLASS_NAMES[folder] and r.modality == "sar"


def _write_voc(path, filename, size, boxes):
  root = ET.Element("annotation")
  ET.SubElement(root, "filename").text = filename
  s = ET.SubElement(root, "size")
  for k, v in zip(("width", "height", "depth"), (*size, 1)):
    ET.SubElement(s, k).text = str(v)
  for box in boxes:
    obj = ET.SubElement(root, "object")
    ET.SubElement(obj, "name").text = "ship"
    b = ET.SubElement(obj, "bndbox")
    for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
      ET.SubElement(b, k).text = str(v)
  ET.ElementTree(root).write(path)


@pytest.fixture()
def ssdd_dir(tmp_path):
  (tmp_path / "Annotations").mkdir()
  (tmp_path / "JPEGImages").mkdir()
  for stem, boxes in (("000001", [(4, 6, 20, 16)]), ("000002", [(1, 1, 9, 9), (30, 20, 40, 30)])):
    Image.new("L", (48, 40), 30).save(tmp_path / "JPEGImages" / f"{stem}.jpg")
    _write_voc(tmp_path / "Annotations" / f"{stem}.xml", f"{stem}.jpg", (48, 40), boxes)
  return tmp_path


def test_ssdd_voc_split_rule_and_tfds_round_trip(ssdd_dir, tmp_path):
  test = _valid(list(ssdd.records(ssdd_dir, "test")))
  train = _valid(list(ssdd.records(ssdd_dir, "train")))
  assert {r.id for r in test} == {"ssdd-000001-count", "ssdd-000001-box"}
  assert train[0].turns[1] == "2"
  _close(_boxes(train[1]), [(1, 1, 9, 9), (30, 20, 40, 30)], 48, 40)
  builder = builders.build("ssdd", tmp_path / "tfds", manual_dir=str(ssdd_dir))
  source = builder.as_data_source(split="train")
  stored = sorted((schema.from_features(source[i]) for i in range(len(source))),
                  key=lambda r: r.id)
  assert [(r.id, r.turns, r.image) for r in stored] == sorted(
      ((r.id, r.turns, r.image) for r in train), key=lambda t: t[0])


def test_caption_vqa_and_scene_folder_fixtures(tmp_path):
  ucm = tmp_path / "ucm"
  (ucm / "imgs").mkdir(parents=True)
  Image.new("RGB", (16, 16)).save(ucm / "imgs" / "1.tif")
  (ucm / "dataset.json").write_text(json.dumps({"images": [
      {"filename": "1.tif", "split": "val", "sentences": [{"raw": "A farm ."}, {"raw": "Fields."}]},
      {"filename": "2.tif", "split": "train", "sentences": [{"raw": "missing image"}]}]}))
  got = _valid(list(ucm_captions.records(ucm, "validation")))
  assert [r.turns[1] for r in got] == ["A farm.", "Fields."]
  assert not list(ucm_captions.records(ucm, "train"))  # its image is missing: skipped
  nwpu = tmp_path / "nwpu"
  (nwpu / "airport").mkdir(parents=True)
  Image.new("RGB", (16, 16)).save(nwpu / "airport" / "airport_001.jpg")
  (nwpu / "dataset_nwpu.json").write_text(json.dumps({"airport": [
      {"filename": "airport_001.jpg", "split": "train", "raw": "planes park.",
       "raw_1": "an airport.", "raw_2": "", "imgid": 0}]}))
  assert [r.turns[1] for r in nwpu_captions.records(nwpu, "train")] == ["planes park.",
                                                                        "an airport."]
  vqa_dir = tmp_path / "rsvqa"
  (vqa_dir / "Images_LR").mkdir(parents=True)
  Image.new("RGB", (16, 16)).save(vqa_dir / "Images_LR" / "7.tif")
  (vqa_dir / "LR_split_test_questions.json").write_text(json.dumps({"questions": [
      {"id": 1, "img_id": 7, "type": "count", "question": "How many buildings?",
       "answers_ids": [5], "active": True},
      {"id": 2, "img_id": 7, "type": "presence", "question": "Is there water?",
       "answers_ids": [6], "active": False}]}))
  (vqa_dir / "LR_split_test_answers.json").write_text(json.dumps({"answers": [
      {"id": 5, "question_id": 1, "answer": "12", "active": True},
      {"id": 6, "question_id": 2, "answer": "no", "active": True}]}))
  (record,) = _valid(list(rsvqa.records(vqa_dir, "test")))
  assert record.turns == ("<image>\nHow many buildings?", "12") and record.task == "vqa"
  scenes = tmp_path / "ucm_scenes"
  for cls in ("dense_residential", "beach"):
    (scenes / cls).mkdir(parents=True)
    for i in range(5):
      Image.new("RGB", (8, 8)).save(scenes / cls / f"{cls}{i:02d}.tif")
  train = _valid(list(scene_folder.records(scenes, "train")))
  val = _valid(list(scene_folder.records(scenes, "validation")))
  assert len(train) == 8 and len(val) == 2
  assert {r.turns[1] for r in val} == {"dense residential", "beach"}
