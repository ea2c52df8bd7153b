"""The coordinate text format and its parser; visual-prompt placeholders."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earthgptx_jax import template as T

SIZES = st.tuples(st.integers(1, 5000), st.integers(1, 5000))  # (width, height)
BIN = st.integers(0, T.COORD_BINS - 1)


@settings(max_examples=300, deadline=None)
@given(size=SIZES, a=BIN, b=BIN, c=BIN, d=BIN)
def test_text_geometry_text_round_trip(size, a, b, c, d):
  width, height = size
  x1, x2, y1, y2 = min(a, c), max(a, c), min(b, d), max(b, d)
  text = f"[{x1},{y1},{x2},{y2}]"
  parsed = T.parse_coordinates(f"The ship is at {text} and the tank at [{a},{b}].", width, height)
  assert len(parsed.boxes) == 1 and len(parsed.points) == 1
  assert T.format_box(parsed.boxes[0], width, height) == text
  assert T.format_point(parsed.points[0], width, height) == f"[{a},{b}]"


@settings(max_examples=300, deadline=None)
@given(size=SIZES, fx=st.floats(0, 1, exclude_max=True), fy=st.floats(0, 1, exclude_max=True),
       fw=st.floats(0, 1), fh=st.floats(0, 1))
def test_geometry_text_geometry_is_within_one_bin(size, fx, fy, fw, fh):
  width, height = size
  box = (fx * width, fy * height, (fx + (1 - fx) * fw) * width, (fy + (1 - fy) * fh) * height)
  (back,) = T.parse_coordinates(T.format_box(box, width, height), width, height).boxes
  for got, want, side in zip(back, box, (width, height, width, height)):
    assert abs(got - want) <= side / T.COORD_BINS + 1e-9


def test_format_is_the_documented_one():
  assert T.format_box((0, 0, 640, 512), 640, 512) == "[0,0,999,999]"
  assert T.format_box((64, 51.2, 320, 256), 640, 512) == "[100,100,500,500]"
  assert T.format_point((320, 256), 640, 512) == "[500,500]"
  # Centre of the bin: a parsed box covers the middle of its quantisation cells.
  (box,) = T.parse_coordinates("[100,100,500,500]", 1000, 1000).boxes
  assert box == pytest.approx((100.5, 100.5, 500.5, 500.5))


@pytest.mark.parametrize("text,message", [
    ("[1,2,3]", "expected 2 \\(point\\) or 4 \\(box\\) integers, got 3"),
    ("[1]", "got 1"),
    ("[1,2,3,4,5,6]", "got 6"),
    ("[1000,0,5,5]", "0..999"),
    ("[-3,4]", "0..999"),
    ("[50,60,40,70]", "x1<=x2"),
    ("[0.12,0.2,0.5,0.6]", "integers in 0..999"),
    ("[12 34 56 78]", "integers in 0..999"),
    ("[1,,2]", "integers in 0..999"),
    ("The ship is at [120,40,", "'\\[120,40,'"),  # an answer cut off mid-box
])
def test_malformed_coordinates_raise_a_parse_error_naming_the_fragment(text, message):
  with pytest.raises(T.CoordinateParseError, match=message):
    T.parse_coordinates(f"answer: {text}", 640, 512)
  assert T.try_parse_boxes(text, 640, 512) is None


@pytest.mark.parametrize("text", ["no box here", "[SEG]", "It is [SEG] at left.", "[]",
                                  "[see figure 2]", ""])
def test_text_without_coordinates_parses_empty(text):
  assert T.parse_coordinates(text, 640, 512) == T.ParsedCoordinates(boxes=[], points=[])
  assert T.try_parse_boxes(text, 640, 512) == []


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="[]0123456789,.- SEGab\n", max_size=40))
def test_any_text_parses_or_raises_coordinate_parse_error(text):
  """Never an exception from deep inside (IndexError, int() ValueError, ...)."""
  try:
    parsed = T.parse_coordinates(text, 640, 512)
  except T.CoordinateParseError:
    assert T.try_parse_boxes(text, 640, 512) is None
    return
  for x1, y1, x2, y2 in parsed.boxes:
    assert 0 <= x1 <= x2 <= 640 and 0 <= y1 <= y2 <= 512
  for x, y in parsed.points:
    assert 0 <= x <= 640 and 0 <= y <= 512


@pytest.mark.parametrize("args,message", [
    (((10, 5, 4, 8), 100, 100), "x1<=x2"),
    (((1, math.nan, 4, 8), 100, 100), "box y1: coordinate must be finite"),
    (((1, 2, 4, 8), 0, 100), "image size"),
])
def test_format_box_rejects_bad_geometry(args, message):
  with pytest.raises(ValueError, match=message):
    T.format_box(*args)


def test_vp_placeholders():
  for k in (1, 2, 10):
    match = T.VP_PLACEHOLDER_RE.fullmatch(T.vp_placeholder(k))
    assert match and int(match.group(1)) == k
  with pytest.raises(ValueError, match="visual prompt index"):
    T.vp_placeholder(0)
  pieces = T.split_placeholders("How is <vp2> placed relative to <vp1>?")
  assert [p for p in pieces if isinstance(p, T.Placeholder)] == [T.Placeholder("vp", 1),
                                                                 T.Placeholder("vp", 0)]
