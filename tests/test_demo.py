"""The browser demo (`python -m earthgptx_jax.demo`), started as a user starts it: bad input is
one clear message and the server keeps answering; in a real headless Chromium a user uploads
real SAR and infrared images, draws a box / a scribble with the mouse, and sees the answer
stream and the overlay appear. Screenshots of each browser case land in the test's tmp dir.

The workdir holds random tiny weights (test_infer's fixture): answers are gibberish, so the
tests check that answers appear, stream and are drawn, not what they say.
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from earthgptx_jax import demo_server, generate, template
from model_fixtures import tiny_config
from test_infer import workdir  # noqa: F401  (the cheap random-weights workdir fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAR_IMAGE = "HRSID_official_samples/data/P0094_0_800_3000_3800.png"
INFRARED_IMAGE = "SIRST/images/Misc_10.png"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MAX_NEW_TOKENS = 8


def _env():
  return {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture(scope="module")
def demo(workdir, tmp_path_factory):  # noqa: F811
  """The demo on a free port, started from the workdir's parent with a relative --workdir."""
  log = tmp_path_factory.mktemp("demo") / "server.log"
  with open(log, "w") as err:
    proc = subprocess.Popen(
        [sys.executable, "-m", "earthgptx_jax.demo", f"--workdir={workdir.name}", "--port=0",
         f"--max_new_tokens={MAX_NEW_TOKENS}"], cwd=workdir.parent, env=_env(),
        stdout=subprocess.PIPE, stderr=err, text=True)
  try:
    for line in proc.stdout:
      if line.startswith("demo: serving on "):
        break
    else:
      pytest.fail(f"the demo exited ({proc.wait()}) before serving:\n{log.read_text()[-3000:]}")
    yield line.split()[3].rstrip("/")
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def _post(url, data=b"", headers=None):
  request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST")
  try:
    with urllib.request.urlopen(request, timeout=600) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def _session(demo):
  return json.loads(_post(f"{demo}/api/session")[1])["session"]


def _ask(demo, session, text, prompts, modality="sar"):
  """The answer's server-sent events, parsed."""
  body = json.dumps(dict(session=session, modality=modality, text=text, prompts=prompts))
  status, raw = _post(f"{demo}/api/ask", body.encode(), {"Content-Type": "application/json"})
  assert status == 200
  return [json.loads(chunk[len("data: "):]) for chunk in raw.decode().split("\n\n") if chunk]


def test_without_a_workdir_it_says_how_to_get_one(tmp_path):
  for args in ([], ["--workdir=no_such_run"]):
    r = subprocess.run([sys.executable, "-m", "earthgptx_jax.demo", *args], cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "--workdir" in r.stderr
    assert "python -m earthgptx_jax.train --config=configs/fusion.py:tiny" in r.stderr


def test_bad_input_is_one_clear_message_and_the_server_keeps_working(demo, shared_data):
  session = _session(demo)
  status, body = _post(f"{demo}/api/image?session={session}&name=broken.png",
                       b"\x89PNG\r\n\x1a\nnot really")
  assert status == 400 and "broken.png" in json.loads(body)["error"]
  assert "corrupt_image" in json.loads(body)["error"]
  assert _ask(demo, session, "What is this?", []) == [
      {"type": "error", "message": "image: none yet; upload one or pick an example"}]
  sar = (shared_data / SAR_IMAGE).read_bytes()
  status, body = _post(f"{demo}/api/image?session={session}&name=sar.png", sar)
  assert status == 200 and json.loads(body)["width"] == 800
  box = {"kind": "box", "points": [[10, 10], [60, 50]]}
  (event,) = _ask(demo, session, "What is inside <vp2>?", [box])
  assert event["type"] == "error" and "<vp2>" in event["message"]
  (event,) = _ask(demo, session, "What is inside <vp1>?",
                  [{"kind": "box", "points": [[10, 10], [900, 50]]}])
  assert event["type"] == "error" and event["message"].startswith("<vp1> (box): ")
  assert "outside the 800x800 image" in event["message"]
  (event,) = _ask(demo, session, "<vp1>?", [{"kind": "lasso", "points": [[1, 1]]}])
  assert event == {"type": "error", "message": "<vp1>: kind 'lasso'; expected point, box or "
                                               "scribble"}
  (event,) = _ask(demo, session, "What?", [], modality="radar")
  assert event["type"] == "error" and "modality" in event["message"]
  (event,) = _ask(demo, "nosuchsession", "What?", [])
  assert "reload the page" in event["message"]
  # The session still holds the good image: the preview (infer's renderer) is served.
  with urllib.request.urlopen(f"{demo}/api/preview?session={session}&modality=sar") as r:
    assert r.headers["Content-Type"] == "image/png" and r.read(4) == b"\x89PNG"
  status, body = _post(f"{demo}/api/example?session={session}&modality=infrared")
  assert status == 200 and json.loads(body)["modality"] == "infrared"


class _ScriptedPredictor:
  """What Demo needs of a Predictor (config, stream), answering without a model: each
  question's answer names the turns it was given, so the test sees what each tab sent."""

  def __init__(self):
    self.config = tiny_config()
    self.records = []

  def stream(self, record, **kwargs):
    self.records.append(record)
    answer = f"answer to turn {len(record.turns) // 2}"
    for n in range(1, len(answer.split()) + 1):
      yield " ".join(answer.split()[:n])
    yield generate.Prediction(answer, [(1.0, 2.0, 30.0, 20.0)], [], [])


def test_a_tab_asks_again_as_soon_as_it_has_its_answer_and_tabs_stay_apart(shared_data):
  scripted = _ScriptedPredictor()
  demo = demo_server.Demo(scripted)
  a, b = demo.new_session(), demo.new_session()
  demo.set_image(a, (shared_data / SAR_IMAGE).read_bytes())
  demo.set_image(b, demo.example("infrared"))
  box = {"kind": "box", "points": [[10, 10], [60, 50]]}
  events = demo.ask(a, "sar", "What is inside <vp1>?", [box])
  streamed = []
  for event in events:  # a page reads up to "done" and may ask at once, stream not yet closed
    streamed.append(event)
    if event["type"] == "done":
      break
  assert [e["type"] for e in streamed] == ["token"] * 4 + ["done"]
  assert [e["text"] for e in streamed[:2]] == ["answer", "answer to"]
  second = list(demo.ask(a, "sar", "And <vp1>?", [box]))
  assert second[-1]["type"] == "done" and second[-1]["turn"] == 2, second[-1]
  assert list(demo.ask(b, "infrared", "Describe it.", []))[-1]["turn"] == 1
  # Each tab's record holds its own turns only.
  assert [len(r.turns) for r in scripted.records] == [2, 4, 2]
  assert scripted.records[1].turns[:2] == (f"{template.IMAGE_PLACEHOLDER}\nWhat is inside "
                                           "<vp1>?", "answer to turn 1")
  assert scripted.records[2].modality == "infrared"
  # The overlay (infer's renderer) and the answer JSON are the last answer's.
  assert demo.session(a).answer["boxes"] == [[1.0, 2.0, 30.0, 20.0]]
  assert demo.session(a).overlay_png.startswith(b"\x89PNG")


@pytest.mark.slow
def test_tabs_keep_their_own_conversations(demo, shared_data):
  a, b = _session(demo), _session(demo)
  for session, path in ((a, SAR_IMAGE), (b, INFRARED_IMAGE)):
    assert _post(f"{demo}/api/image?session={session}",
                 (shared_data / path).read_bytes())[0] == 200
  box = {"kind": "box", "points": [[10, 10], [60, 50]]}
  first = _ask(demo, a, "What is inside <vp1>?", [box])
  assert first[-1]["type"] == "done" and first[-1]["turn"] == 1
  assert [e["type"] for e in first[:-1]] == ["token"] * (len(first) - 1)
  assert _ask(demo, b, "Describe the image.", [], "infrared")[-1]["turn"] == 1
  second = _ask(demo, a, "And near <vp2>?", [box, {"kind": "point", "points": [[5, 5]]}])[-1]
  assert second["turn"] == 2 and not second["restarted"]  # a prompt added: same conversation
  assert _ask(demo, b, "And now?", [], "infrared")[-1]["turn"] == 2
  # Removing a prompt the earlier turns used starts the conversation over.
  third = _ask(demo, a, "What is at <vp1>?", [{"kind": "point", "points": [[5, 5]]}])[-1]
  assert third["turn"] == 1 and third["restarted"]


# ----------------------------------------------------------------------------------------------
# In a real browser.


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed "
                                  "(pip install -e '.[test]')")
  if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    if os.environ.get("CI"):
      raise FileNotFoundError(f"{CHROMIUM} / {CHROMEDRIVER} missing in CI (.ci/run installs "
                              "them)")
    pytest.skip("no Chromium: apt-get install -y chromium chromium-driver")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--window-size=1400,1100",
               f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
  yield driver
  driver.quit()


class Page:
  """The demo page in the browser, driven as a user drives it."""

  def __init__(self, driver, url):
    from selenium.webdriver.support.ui import WebDriverWait
    self.driver = driver
    self.wait = WebDriverWait(driver, 600)  # the first answer compiles the model
    driver.get(url)
    self.wait.until(lambda d: d.execute_script("return S.session !== null"))

  def modality(self, value):
    from selenium.webdriver.support.select import Select
    Select(self.find("#modality")).select_by_value(value)

  def find(self, css):
    return self.driver.find_element("css selector", css)

  def upload(self, path):
    shown = self.driver.execute_script("return S.img && S.img.src")
    self.find("#file").send_keys(str(path))
    self.wait.until(lambda d: d.execute_script("return S.img && S.img.src") != shown
                    or self.find("#error").text)

  def drag(self, points):
    """Mouse down at the first (image pixel) point, through the others, up at the last."""
    from selenium.webdriver.common.action_chains import ActionChains
    canvas = self.find("#canvas")
    # WebDriver offsets count from the element's in-view centre, floored to a CSS pixel; the
    # image starts inside the canvas's border.
    left, top, right, bottom, border, scale = self.driver.execute_script(
        "const c = document.getElementById('canvas'), r = c.getBoundingClientRect();"
        "return [r.left, r.top, r.right, r.bottom, c.clientLeft, S.scale]")
    cx, cy = math.floor((left + right) / 2), math.floor((top + bottom) / 2)
    offsets = [(round(left + border + x * scale - cx), round(top + border + y * scale - cy))
               for x, y in points]
    chain = ActionChains(self.driver).move_to_element_with_offset(canvas, *offsets[0])
    chain.click_and_hold()
    for xy in offsets[1:]:
      chain.move_to_element_with_offset(canvas, *xy)
    chain.release().perform()

  def ask(self, text):
    """Types `text`, asks, waits for the answer; -> the answer's element."""
    before = len(self.driver.find_elements("css selector", ".assistant"))
    question = self.find("#question")
    question.clear()
    question.send_keys(text)
    self.find("#ask").click()
    self.wait.until(lambda d: len(d.find_elements("css selector", ".assistant")) > before and
                    "streaming" not in d.find_elements("css selector", ".assistant")[-1]
                    .get_attribute("class"))
    return self.driver.find_elements("css selector", ".assistant")[-1]

  def overlay_turn(self):
    return self.driver.execute_script(
        "const o = document.getElementById('overlay');"
        "return o.complete && o.naturalWidth > 0 ? o.dataset.turn : null")


def _answered(page, answer, turn, width):
  assert "done" in answer.get_attribute("class"), page.find("#error").text
  assert answer.text.strip()
  # Streamed: the answer arrived as one event per generated token, shown as it came.
  assert int(answer.get_attribute("data-tokens")) >= 2
  page.wait.until(lambda d: page.overlay_turn() == str(turn))
  assert page.driver.execute_script("return document.getElementById('overlay').naturalWidth"
                                    ) == width
  assert page.find("#dl-png").get_attribute("href").endswith("download=1")
  assert "disabled" not in page.find("#dl-json").get_attribute("class")


@pytest.mark.slow
def test_box_on_a_sar_image_answered_in_the_browser(demo, browser, shared_data, tmp_path):
  page = Page(browser, demo)
  page.upload(shared_data / SAR_IMAGE)
  page.modality("sar")
  page.drag([(300, 300), (420, 380), (480, 440)])  # tool "box" is the default
  (prompt,) = page.driver.execute_script("return S.prompts")
  assert prompt["kind"] == "box"  # where the mouse went, to the pixel (offsets are rounded)
  assert np.abs(np.subtract(prompt["points"], [[300, 300], [480, 440]])).max() <= 1.5
  assert page.find("#question").get_attribute("value") == "<vp1>"
  _answered(page, page.ask("What is inside <vp1>?"), 1, 800)
  # A second turn in the same conversation, then a screenshot of both.
  _answered(page, page.ask("Where is <vp1>?"), 2, 800)
  assert len(browser.find_elements("css selector", ".user")) == 2
  browser.save_screenshot(str(tmp_path / "demo_sar_box.png"))


@pytest.mark.slow
def test_scribble_on_an_infrared_image_segmented_in_the_browser(demo, browser, shared_data,
                                                                tmp_path):
  page = Page(browser, demo)
  page.upload(shared_data / INFRARED_IMAGE)
  page.modality("infrared")
  page.find("#tool-scribble").click()
  stroke = [(46, 92), (54, 98), (60, 103), (66, 108), (74, 112)]  # over the hot target
  page.drag(stroke)
  (prompt,) = page.driver.execute_script("return S.prompts")
  assert prompt["kind"] == "scribble" and len(prompt["points"]) >= 3
  width = page.driver.execute_script("return S.w")
  _answered(page, page.ask("Segment <vp1>."), 1, width)
  browser.save_screenshot(str(tmp_path / "demo_infrared_scribble.png"))


@pytest.mark.slow
def test_a_corrupt_file_is_a_message_and_the_page_still_answers(demo, browser, tmp_path):
  page = Page(browser, demo)
  broken = tmp_path / "broken.tif"
  broken.write_bytes(b"II*\x00" + b"\x00" * 64)
  page.upload(broken)
  assert "broken.tif" in page.find("#error").text
  assert "corrupt_image" in page.find("#error").text
  browser.save_screenshot(str(tmp_path / "demo_corrupt_file.png"))
  page.find("#ex-optical").click()
  page.wait.until(lambda d: d.execute_script("return S.img !== null"))
  assert page.find("#error").text == ""
  page.find("#tool-point").click()
  page.drag([(30, 30)])
  _answered(page, page.ask("What is at <vp1>?"), 1, page.driver.execute_script("return S.w"))
  browser.save_screenshot(str(tmp_path / "demo_after_corrupt_file.png"))
