"""`blip-jax demo`: a local web page to try BLIP on a photo (Flask, one page, no assets fetched).

Drop or choose a photo: captions by beam search (the best 3 beams) and by nucleus sampling (3
samples); type texts: the ITM probability and ITC cosine of each; ask a question (with a VQA
model); search a folder of images by text (image features computed once, cached under
`$BLIP_JAX_CACHE/demo_index/`, refreshed for files that changed). An upload that cannot be decoded
answers with an error the page shows; the server goes on.

`DemoModels` holds the computations (plain methods on the models, usable without the web layer);
`make_app` is the web layer; `serve` runs it.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import sys
import threading
import uuid

import numpy as np
from flask import Flask, jsonify, request, send_file
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

import blip_jax
from blip_jax.checkpoints import hub
from blip_jax.preprocess import ImageDecodeError, to_pil
from blip_jax.quiet import verbose

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
MAX_UPLOAD_BYTES = 32 << 20


class DemoModels:
  """The demo's models and what it computes with them. JAX calls are serialised by one lock (the
  web server answers requests on threads)."""

  def __init__(self, caption, retrieval=None, vqa=None, images: str | None = None, vocab: str | None = None,
               log=print):
    load = (lambda m: m if isinstance(m, blip_jax.BlipModel) else blip_jax.load(m, vocab=vocab))
    self.captioner = load(caption)
    if self.captioner.config.kind not in ("caption", "pretrain"):
      raise ValueError(f"--caption: a {self.captioner.config.kind} model has no caption decoder")
    if retrieval is None and self.captioner.config.has_itc:
      self.matcher = self.captioner  # a pretraining model scores and searches too
    else:
      self.matcher = load(retrieval) if retrieval is not None else None
    if self.matcher is not None and not self.matcher.config.has_itc:
      raise ValueError(f"--retrieval: a {self.matcher.config.kind} model has no ITM/ITC heads")
    self.answerer = load(vqa) if vqa is not None else None
    if self.answerer is not None and self.answerer.config.kind != "vqa":
      raise ValueError(f"--vqa: a {self.answerer.config.kind} model is not a VQA model")
    for name, m in (("caption", self.captioner), ("retrieval", self.matcher), ("vqa", self.answerer)):
      if m is not None and m.tokenizer is None:
        raise ValueError(f"the {name} model has no tokenizer; pass --vocab path/to/vocab.txt")
    self.lock = threading.Lock()
    self.uploads: dict[str, object] = {}  # id -> PIL image (the latest few)
    self.index = None
    if images:
      if self.matcher is None:
        raise ValueError("--images needs a model with ITM/ITC heads (--retrieval, or a pretraining --caption)")
      self.index = ImageIndex(images, self.matcher, key=str(retrieval or caption), log=log)

  # ---- the computations ----
  def add_upload(self, data: bytes):
    """Decodes an uploaded file (ImageDecodeError if it is not an image); returns its id."""
    img = to_pil(data)
    uid = uuid.uuid4().hex[:12]
    self.uploads[uid] = img
    while len(self.uploads) > 32:
      self.uploads.pop(next(iter(self.uploads)))
    return uid

  def image(self, uid: str):
    if uid not in self.uploads:
      raise KeyError(f"no uploaded image {uid!r} (upload it again)")
    return self.uploads[uid]

  def captions(self, uid: str, n: int = 3) -> dict:
    m = self.captioner
    with self.lock:
      pixels = m.preprocess([self.image(uid)])
      beam = m.generate(pixels, num_beams=3, num_captions=n, max_length=20, min_length=5)[0]
      nucleus = m.generate(pixels, top_p=0.9, num_captions=n, max_length=20, min_length=5, seed=0)[0]
    return {"beam": list(beam), "nucleus": list(nucleus)}

  def scores(self, uid: str, texts: list[str]) -> list[dict]:
    m = self.matcher
    if m is None:
      raise ValueError("no model with ITM/ITC heads: start the demo with --retrieval")
    texts = [t for t in texts if t.strip()]
    if not texts:
      raise ValueError("type at least one text")
    with self.lock:
      ids, mask = m.tokenize([blip_jax.pre_caption(t, 30) for t in texts], max_length=35)
      pixels = m.preprocess([self.image(uid)])
      itm = np.asarray(m.itm_prob(np.repeat(pixels, len(texts), axis=0), ids, mask))
      cos = np.asarray(m.text_feat(ids, mask)) @ np.asarray(m.image_feat(pixels))[0]
    return [{"text": t, "itm": float(p), "itc": float(c)} for t, p, c in zip(texts, itm, cos)]

  def answer(self, uid: str, question: str) -> str:
    if self.answerer is None:
      raise ValueError("no VQA model: start the demo with --vqa")
    if not question.strip():
      raise ValueError("type a question")
    with self.lock:
      return self.answerer.answer([self.image(uid)], [question])[0]

  def search(self, query: str, k: int = 8) -> list[dict]:
    if self.index is None:
      raise ValueError("no image folder: start the demo with --images DIR")
    if not query.strip():
      raise ValueError("type what to search for")
    with self.lock:
      return self.index.search(query, k)


class ImageIndex:
  """ITC features of every image under a folder, computed once and cached (per file: path, size,
  mtime; a changed or new file is encoded again, a removed one dropped)."""

  def __init__(self, folder: str, model, key: str, batch: int = 16, log=print):
    self.model, self.folder = model, os.path.abspath(folder)
    if not os.path.isdir(self.folder):
      raise FileNotFoundError(f"--images {folder}: not a folder")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(self.folder) for f in fs
                   if f.lower().endswith(IMAGE_EXTS))
    stamp = {f: (os.path.getsize(f), int(os.path.getmtime(f))) for f in files}
    digest = hashlib.sha1(f"{os.path.abspath(key) if os.path.exists(key) else key}|{self.folder}|"
                          f"{model.config.vision.image_size}".encode()).hexdigest()[:16]
    self.cache = os.path.join(hub.cache_dir(), "demo_index", digest + ".npz")
    known = {}
    if os.path.exists(self.cache):
      z = np.load(self.cache, allow_pickle=False)
      for f, size, mtime, feat in zip(z["paths"], z["sizes"], z["mtimes"], z["feats"]):
        if stamp.get(str(f)) == (int(size), int(mtime)):
          known[str(f)] = feat
    todo = [f for f in files if f not in known]
    self.skipped = []
    for i in range(0, len(todo), batch):
      chunk, good = todo[i:i + batch], []
      for f in chunk:
        try:
          good.append((f, model.preprocess([f])[0]))
        except ImageDecodeError as e:
          self.skipped.append(str(e))
      if good:
        feats = np.asarray(model.image_feat(np.stack([p for _, p in good])))
        known.update({f: v for (f, _), v in zip(good, feats)})
    self.paths = [f for f in files if f in known]
    self.feats = np.stack([known[f] for f in self.paths]) if self.paths else np.zeros((0, 1), np.float32)
    if todo:
      os.makedirs(os.path.dirname(self.cache), exist_ok=True)
      tmp = self.cache + ".tmp.npz"
      np.savez(tmp, paths=np.array(self.paths), sizes=np.array([stamp[f][0] for f in self.paths]),
               mtimes=np.array([stamp[f][1] for f in self.paths]), feats=self.feats)
      os.replace(tmp, self.cache)
    self.encoded = len(todo) - len(self.skipped)
    log(f"image index: {len(self.paths)} images ({self.encoded} encoded now, {len(self.paths) - self.encoded} from "
        f"the cache, {len(self.skipped)} undecodable skipped)")

  def search(self, query: str, k: int) -> list[dict]:
    if not self.paths:
      return []
    ids, mask = self.model.tokenize([blip_jax.pre_caption(query, 30)], max_length=35)
    sims = self.feats @ np.asarray(self.model.text_feat(ids, mask))[0]
    top = np.argsort(-sims)[:k]
    return [{"index": int(i), "name": os.path.relpath(self.paths[i], self.folder), "itc": float(sims[i])} for i in top]


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>BLIP demo (blip_jax)</title>
<style>
body{font-family:system-ui,sans-serif;max-width:980px;margin:24px auto;color:#222}
h1{font-size:22px} h2{font-size:16px;margin:18px 0 6px}
#drop{border:2px dashed #889;border-radius:8px;padding:18px;text-align:center;background:#f6f7fb}
#drop.over{background:#e3e8ff} #preview{max-width:320px;max-height:320px;display:none;margin-top:10px}
#error{color:#b00020;font-weight:600;min-height:1em} .cols{display:flex;gap:28px} .cols>div{flex:1}
li{margin:3px 0} table{border-collapse:collapse} td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}
#results img{height:110px;margin:4px;border-radius:4px} .muted{color:#777;font-size:13px}
textarea{width:100%;height:60px} input[type=text]{width:70%}
</style></head><body>
<h1>BLIP demo <span class="muted">blip_jax &middot; __MODELS__</span></h1>
<div id="drop">Drop a photo here, or <input type="file" id="file" accept="image/*">
<div><img id="preview" alt="uploaded photo"></div></div>
<div id="error"></div>
<div class="cols">
 <div><h2>Captions (beam search, 3 best)</h2><ol id="beam"></ol>
      <h2>Captions (nucleus sampling, p=0.9)</h2><ol id="nucleus"></ol></div>
 <div><h2>Image-text matching</h2><textarea id="texts" placeholder="one text per line"></textarea>
      <button id="score">Score</button><table id="scores"></table>
      <h2>Question</h2><input type="text" id="question" placeholder="what is in the picture?">
      <button id="ask">Ask</button><div id="answer"></div></div>
</div>
<h2>Search the image folder</h2><input type="text" id="query" placeholder="a dog on the grass">
<button id="search">Search</button><div id="results" class="muted">__SEARCH__</div>
<script>
let uid = null;
const $ = (id) => document.getElementById(id);
function showError(msg) { $('error').textContent = msg || ''; }
async function call(url, opts) {
  const r = await fetch(url, opts); const j = await r.json();
  if (!r.ok) { throw new Error(j.error || r.statusText); } return j;
}
function list(id, items) { $(id).innerHTML = ''; for (const t of items) { const li = document.createElement('li');
  li.textContent = t; $(id).appendChild(li); } }
async function upload(file) {
  showError(''); list('beam', []); list('nucleus', []); $('preview').style.display = 'none'; uid = null;
  $('beam').setAttribute('data-state', 'working');
  const fd = new FormData(); fd.append('image', file);
  try {
    const j = await call('/api/upload', {method: 'POST', body: fd});
    uid = j.id; $('preview').src = '/api/upload/' + uid; $('preview').style.display = 'block';
    list('beam', j.captions.beam); list('nucleus', j.captions.nucleus);
    $('beam').setAttribute('data-state', 'done');
  } catch (e) { showError(e.message); $('beam').setAttribute('data-state', 'error'); }
}
$('file').addEventListener('change', (e) => { if (e.target.files.length) upload(e.target.files[0]); });
$('drop').addEventListener('dragover', (e) => { e.preventDefault(); $('drop').classList.add('over'); });
$('drop').addEventListener('dragleave', () => $('drop').classList.remove('over'));
$('drop').addEventListener('drop', (e) => { e.preventDefault(); $('drop').classList.remove('over');
  if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]); });
$('score').addEventListener('click', async () => {
  showError(''); if (!uid) { showError('upload a photo first'); return; }
  try { const j = await call('/api/score', {method: 'POST', headers: {'Content-Type': 'application/json'},
          body: JSON.stringify({id: uid, texts: $('texts').value.split('\\n')})});
    $('scores').innerHTML = '<tr><th>text</th><th>ITM p(match)</th><th>ITC cosine</th></tr>';
    for (const s of j.scores) { const tr = document.createElement('tr');
      for (const v of [s.text, s.itm.toFixed(4), s.itc.toFixed(4)]) { const td = document.createElement('td');
        td.textContent = v; tr.appendChild(td); } $('scores').appendChild(tr); }
  } catch (e) { showError(e.message); }
});
$('ask').addEventListener('click', async () => {
  showError(''); if (!uid) { showError('upload a photo first'); return; }
  try { const j = await call('/api/answer', {method: 'POST', headers: {'Content-Type': 'application/json'},
          body: JSON.stringify({id: uid, question: $('question').value})}); $('answer').textContent = j.answer;
  } catch (e) { showError(e.message); }
});
$('search').addEventListener('click', async () => {
  showError('');
  try { const j = await call('/api/search?q=' + encodeURIComponent($('query').value));
    $('results').innerHTML = '';
    for (const r of j.results) { const img = document.createElement('img'); img.src = '/api/indexed/' + r.index;
      img.title = r.name + '  (ITC ' + r.itc.toFixed(3) + ')'; img.alt = r.name; $('results').appendChild(img); }
  } catch (e) { showError(e.message); }
});
</script></body></html>"""


def make_app(models: DemoModels):


  app = Flask("blip_jax.demo")
  app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
  names = f"caption: {getattr(models.captioner.config, 'kind', '?')}" + \
      (f", ITM/ITC: {models.matcher.config.kind}" if models.matcher else "") + (", VQA" if models.answerer else "")
  search_note = (f"{len(models.index.paths)} images indexed" if models.index else "start with --images DIR to search")

  def error(msg, code=400):
    return jsonify({"error": str(msg)}), code

  @app.get("/")
  def page():
    return PAGE.replace("__MODELS__", names).replace("__SEARCH__", search_note)

  @app.post("/api/upload")
  def upload():
    f = request.files.get("image")
    if f is None:
      return error("no file in the upload")
    try:
      uid = models.add_upload(f.read())
    except ImageDecodeError as e:
      why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e).split("(", 1)[-1].rstrip(")"))
      return error(f"{f.filename or 'the upload'} is not an image that can be decoded ({why})")
    return jsonify({"id": uid, "captions": models.captions(uid)})

  @app.get("/api/upload/<uid>")
  def uploaded(uid):
    try:
      img = models.image(uid)
    except KeyError as e:
      return error(e, 404)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    buf.seek(0)
    return send_file(buf, mimetype="image/jpeg")

  @app.post("/api/score")
  def score():
    body = request.get_json(force=True, silent=True) or {}
    try:
      return jsonify({"scores": models.scores(str(body.get("id")), list(body.get("texts") or []))})
    except (ValueError, KeyError) as e:
      return error(e)

  @app.post("/api/answer")
  def answer():
    body = request.get_json(force=True, silent=True) or {}
    try:
      return jsonify({"answer": models.answer(str(body.get("id")), str(body.get("question") or ""))})
    except (ValueError, KeyError) as e:
      return error(e)

  @app.get("/api/search")
  def search():
    try:
      return jsonify({"results": models.search(request.args.get("q", ""))})
    except ValueError as e:
      return error(e)

  @app.get("/api/indexed/<int:i>")
  def indexed(i):
    if models.index is None or not 0 <= i < len(models.index.paths):
      return error("no such image", 404)
    return send_file(models.index.paths[i])

  @app.errorhandler(413)
  def too_large(_):
    return error(f"the upload is larger than {MAX_UPLOAD_BYTES >> 20} MB", 413)

  @app.errorhandler(Exception)
  def unexpected(e):  # one bad request never takes the server down; the page shows why
    if isinstance(e, HTTPException):
      return error(e.description, e.code)
    print(f"demo: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return error(f"{type(e).__name__}: {e}", 500)

  return app


def serve(caption, retrieval=None, vqa=None, images=None, host="127.0.0.1", port=7860, vocab=None):
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  log("loading models ...")
  models = DemoModels(caption, retrieval, vqa, images, vocab=vocab, log=log)
  app = make_app(models)

  logging.getLogger("werkzeug").setLevel(logging.INFO if verbose() else logging.WARNING)  # no line per request
  server = make_server(host, port, app, threaded=True)
  log(f"BLIP demo on http://{host}:{server.server_port}/  (Ctrl-C to stop)")
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
