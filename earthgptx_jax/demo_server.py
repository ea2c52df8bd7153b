"""The browser demo's server: one loaded `Predictor`, per-tab conversations, streamed answers.

Why a small standard-library HTTP server and a plain page (`demo_page.html`, vanilla JS on a
canvas) rather than Gradio, the field's convention: the demo must draw all three prompt kinds
(click a point, drag a box, brush a scribble) and label each `<vpN>` on the image, and its
peers' Gradio box widgets are what their users report broken ("no response after drawing
bounding box"). A canvas does all three in a few lines, needs no npm build and no extra
dependency, and a headless browser drives it with plain mouse events (tests/test_demo.py).

Every answer runs through `Predictor.stream` (the infer path: `request_record`,
`validate_request`, the training example pipeline, the jitted generator) and every picture
through `overlay.render_overlay`, infer's renderer. State is per session id (one per browser
tab, held by the page): its image, modality, prompts of each turn and conversation; the model
call is serialised by one lock, so tabs never see each other's turns.
"""

from __future__ import annotations

import collections
import dataclasses
import http.server
import io
import json
import pathlib
import secrets
import sys
import threading
import traceback
import urllib.parse
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np

from data_pipelines import preprocess, schema, synthetic
from earthgptx_jax import generate, overlay, template
from earthgptx_jax.predictor import (InferenceError, Predictor, prediction_json,
                                     request_record, validate_request)

PAGE = pathlib.Path(__file__).with_name("demo_page.html")
MAX_IMAGE_BYTES = 64 << 20
MAX_SESSIONS = 64  # the least recently used tab's conversation is forgotten beyond this
EXAMPLE_INDEX = {"optical": 3, "sar": 3, "infrared": 3}  # scenes of the synthetic generator
_NO_PREDICTION = generate.Prediction("", [], [], [])


@dataclasses.dataclass
class Session:
  image: bytes | None = None
  modality: str = "optical"
  # (question, answer, the prompts it was asked with) per earlier turn.
  history: list[tuple[str, str, list]] = dataclasses.field(default_factory=list)
  overlay_png: bytes | None = None
  answer: dict | None = None
  busy: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def parse_prompts(items: Any) -> list[schema.VisualPrompt]:
  """The page's prompts, `[{"kind": "point"|"box"|"scribble", "points": [[x, y], ...]}]` in
  original pixels, -> VisualPrompts (their bounds are `validate_request`'s to check)."""
  if not isinstance(items, list):
    raise InferenceError("prompts: expected a list")
  prompts = []
  for k, item in enumerate(items):
    where = template.vp_placeholder(k + 1)
    try:
      kind = item["kind"]
      points = np.asarray(item["points"], np.float32).reshape(-1, 2)
    except (KeyError, TypeError, ValueError):
      raise InferenceError(f"{where}: expected {{kind, points: [[x, y], ...]}}") from None
    want = {"point": (1, 1), "box": (2, 2), "scribble": (2, 10_000)}.get(kind)
    if want is None:
      raise InferenceError(f"{where}: kind {kind!r}; expected point, box or scribble")
    if not want[0] <= len(points) <= want[1] or not np.isfinite(points).all():
      raise InferenceError(f"{where}: a {kind} needs {want[0]} finite points, got {len(points)}")
    if kind == "box":
      points = np.sort(points, axis=0)  # dragged in any direction
    prompts.append(schema.VisualPrompt(kind, points))
  return prompts


class Demo:
  """The demo's state and actions, independent of HTTP (the handler below only routes)."""

  def __init__(self, predictor: Predictor, *, max_new_tokens: int = 64):
    self.predictor = predictor
    self.max_new_tokens = max_new_tokens
    self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
    self._sessions_lock = threading.Lock()
    self._model_lock = threading.Lock()  # one generation at a time, whichever tab asks
    self._examples: dict[str, bytes] = {}

  def new_session(self) -> str:
    sid = secrets.token_hex(8)
    with self._sessions_lock:
      self._sessions[sid] = Session()
      while len(self._sessions) > MAX_SESSIONS:
        self._sessions.popitem(last=False)
    return sid

  def session(self, sid: str) -> Session:
    with self._sessions_lock:
      if sid not in self._sessions:
        raise InferenceError(f"session: {sid!r} is unknown or expired; reload the page")
      self._sessions.move_to_end(sid)
      return self._sessions[sid]

  def example(self, modality: str) -> bytes:
    """A PNG scene of `modality` rendered by the project's synthetic generator at the size
    the model was trained on (made on first request, then kept)."""
    if modality not in EXAMPLE_INDEX:
      raise InferenceError(f"example: unknown modality {modality!r}; expected one of "
                           f"{template.MODALITIES}")
    if modality not in self._examples:
      self._examples[modality] = synthetic.make_record(
          modality, "validation", EXAMPLE_INDEX[modality],
          self.predictor.config.data.synthetic).image
    return self._examples[modality]

  def set_image(self, sid: str, data: bytes, name: str = "image") -> dict:
    """A new image for the session (its conversation starts over) -> its size; the image is
    decoded first, and a bad one leaves the session as it was."""
    session = self.session(sid)
    if len(data) > MAX_IMAGE_BYTES:
      raise InferenceError(f"image {name!r}: {len(data)} bytes; the demo takes up to "
                           f"{MAX_IMAGE_BYTES >> 20} MB")
    try:
      pixels = preprocess.decode_image(data)
    except ValueError as e:
      raise InferenceError(f"image {name!r}: corrupt_image: {e}") from None
    session.image, session.history = data, []
    session.overlay_png = session.answer = None
    height, width = pixels.shape[:2]
    return {"width": width, "height": height, "bands": int(pixels.shape[2]), "name": name}

  def preview(self, sid: str, modality: str) -> bytes:
    """The session's image as the model sees it for `modality` (infer's renderer, nothing
    drawn): 16-bit and multi-band images shown the way they are preprocessed."""
    session = self.session(sid)
    if session.image is None:
      raise InferenceError("image: none yet; upload one or pick an example")
    if modality not in template.MODALITIES:
      raise InferenceError(f"modality: unknown value {modality!r}; expected one of "
                           f"{template.MODALITIES}")
    return _png(overlay.render_overlay(session.image, modality, [], _NO_PREDICTION,
                                       self.predictor.config.model.vision.preprocess))

  def ask(self, sid: str, modality: str, text: str, prompt_items: Any) -> Iterator[dict]:
    """Streams the answer's events: {"type": "token", "text": answer so far} per token, then
    {"type": "done", ...} with the answer's JSON; any bad input is one {"type": "error"}."""
    try:
      session = self.session(sid)
    except InferenceError as e:
      yield {"type": "error", "message": str(e)}
      return
    if not session.busy.acquire(blocking=False):
      yield {"type": "error", "message": "busy: this tab's previous question is still being "
                                         "answered"}
      return
    try:
      final = yield from self._ask(session, modality, text, prompt_items)
    except InferenceError as e:
      final = {"type": "error", "message": str(e)}
    except Exception as e:  # pylint: disable=broad-except  (the page must keep working)
      traceback.print_exc(file=sys.stderr)
      final = {"type": "error", "message": f"internal error ({type(e).__name__}: {e}); "
                                           "details in the server's log"}
    finally:
      session.busy.release()
    yield final  # after the release: a tab may ask again as soon as it has its answer

  def _ask(self, session: Session, modality: str, text: str, prompt_items
           ) -> Generator[dict, None, dict]:
    """Yields the token events; returns the "done" event."""
    if session.image is None:
      raise InferenceError("image: none yet; upload one or pick an example")
    if not isinstance(text, str) or not text.strip():
      raise InferenceError("question: empty; type a question")
    prompts = parse_prompts(prompt_items)
    keys = [_prompt_key(p) for p in prompts]
    # Earlier turns stay only while their prompts are still the first ones (prompts may be
    # added during a conversation; removing or moving one, or a new modality, starts over).
    restarted = bool(session.history) and (modality != session.modality or any(
        used != keys[:len(used)] for _, _, used in session.history))
    history = [] if restarted else session.history
    record = request_record(session.image, modality, text, prompts,
                            history=[(q, a) for q, a, _ in history])
    names = [f"{template.vp_placeholder(k + 1)} ({p.kind})" for k, p in enumerate(prompts)]
    # Earlier questions name only earlier prompts: a fault is in this question or a prompt.
    validate_request(record, image="image", text="question", modality="modality",
                     prompts=names)
    prediction = None
    with self._model_lock:
      for update in self.predictor.stream(record, max_new_tokens=self.max_new_tokens):
        if isinstance(update, str):
          yield {"type": "token", "text": update}
        else:
          prediction = update
    picture = overlay.render_overlay(session.image, modality, prompts, prediction,
                                     self.predictor.config.model.vision.preprocess)
    answer = {"question": text, "modality": modality,
              "prompts": [{"kind": p.kind, "points": p.points.tolist()} for p in prompts],
              **prediction_json(prediction)}
    session.modality = modality
    session.history = [*history, (text, prediction.answer, keys)]
    session.overlay_png, session.answer = _png(picture), answer
    return {"type": "done", "turn": len(session.history), "restarted": restarted, **answer}

  def reset(self, sid: str) -> None:
    self.session(sid).history = []


def _prompt_key(p: schema.VisualPrompt) -> list:
  return [p.kind, np.round(np.asarray(p.points, np.float64), 2).tolist()]


def _png(image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
  demo: Demo  # set by make_server on a subclass
  protocol_version = "HTTP/1.1"

  def log_message(self, fmt, *args):  # one quiet line per request on stderr
    sys.stderr.write(f"demo: {self.command} {self.path.split('?')[0]} {fmt % args}\n")

  def _send(self, status: int, body: bytes, content_type: str, headers=()) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    for k, v in headers:
      self.send_header(k, v)
    self.end_headers()
    self.wfile.write(body)

  def _json(self, obj, status: int = 200, headers=()) -> None:
    self._send(status, json.dumps(obj).encode(), "application/json", headers)

  def _query(self) -> dict[str, str]:
    return {k: v[-1] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query
                                                        ).items()}

  def _body(self) -> bytes:
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def do_GET(self):  # pylint: disable=invalid-name
    route, q = urllib.parse.urlsplit(self.path).path, self._query()
    try:
      if route == "/":
        self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
      elif route == "/api/preview":
        self._send(200, self.demo.preview(q.get("session", ""), q.get("modality", "")),
                   "image/png")
      elif route == "/api/overlay.png":
        png = self.demo.session(q.get("session", "")).overlay_png
        if png is None:
          raise InferenceError("overlay: no answer yet")
        self._send(200, png, "image/png", _attachment(q, "earthgptx_overlay.png"))
      elif route == "/api/answer.json":
        answer = self.demo.session(q.get("session", "")).answer
        if answer is None:
          raise InferenceError("answer: no answer yet")
        self._json(answer, headers=_attachment(q, "earthgptx_answer.json"))
      else:
        self._json({"error": f"not found: {route}"}, 404)
    except InferenceError as e:
      self._json({"error": str(e)}, 400)

  def do_POST(self):  # pylint: disable=invalid-name
    route, q = urllib.parse.urlsplit(self.path).path, self._query()
    try:
      if route == "/api/session":
        self._json({"session": self.demo.new_session(), "modalities": list(template.MODALITIES)})
      elif route == "/api/image":
        body = self._body()
        self._json(self.demo.set_image(q.get("session", ""), body, q.get("name", "upload")))
      elif route == "/api/example":
        modality = q.get("modality", "")
        data = self.demo.example(modality)
        self._json({**self.demo.set_image(q.get("session", ""), data, f"example_{modality}.png"),
                    "modality": modality})
      elif route == "/api/reset":
        self.demo.reset(q.get("session", ""))
        self._json({"ok": True})
      elif route == "/api/ask":
        self._stream(self._body())
      else:
        self._json({"error": f"not found: {route}"}, 404)
    except InferenceError as e:
      self._json({"error": str(e)}, 400)

  def _stream(self, body: bytes) -> None:
    """Server-sent events, one per token, flushed as they come (chunked transfer)."""
    try:
      request = json.loads(body or b"{}")
      events = self.demo.ask(str(request.get("session", "")), str(request.get("modality", "")),
                             request.get("text", ""), request.get("prompts", []))
    except (json.JSONDecodeError, AttributeError):
      events = iter([{"type": "error", "message": "request: not a JSON object"}])
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-store")
    self.send_header("Transfer-Encoding", "chunked")
    self.end_headers()
    try:
      for event in events:
        data = f"data: {json.dumps(event)}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
      self.wfile.write(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):  # the tab closed; the answer still ends
      for _ in events:
        pass


def _attachment(query: dict[str, str], name: str):
  return [("Content-Disposition", f'attachment; filename="{name}"')] if query.get(
      "download") else []


def make_server(demo: Demo, port: int, host: str = "127.0.0.1") -> http.server.HTTPServer:
  """A threaded HTTP server for `demo` (port 0: any free one; `server.server_port` tells)."""
  handler = type("DemoHandler", (_Handler,), {"demo": demo})
  server = http.server.ThreadingHTTPServer((host, port), handler)
  server.daemon_threads = True
  return server
