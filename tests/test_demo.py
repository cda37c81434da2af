"""`blip-jax demo` end to end in a real headless browser (Debian's Chromium through chromedriver):
a photo uploaded through the page's file input shows the captions the library gives for it (beam
and nucleus), typed texts show their ITM probability and ITC cosine, a question its answer, a search
the folder's images in the library's order; an undecodable upload shows an error in the page and
the server goes on answering. A screenshot of the page is taken and checked to be a real PNG."""
import os
import shutil
import subprocess
import sys

import jax
import pytest
from conftest import COCO, ODD, one_device_env
from webdriver import Browser, free_port, wait_http

import blip_jax
from blip_jax.models.config import tiny_config
from blip_jax.models.init import init_params
from blip_jax.tokenizers import BertTokenizer

PHOTOS = ["COCO_val2014_000000209186.jpg", "COCO_val2014_000000068993.jpg", "COCO_val2014_000000271852.jpg",
          "COCO_val2014_000000545039.jpg"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, vocab_path):
  """A tiny pretraining model (captions + ITM/ITC) and a tiny VQA model saved as ours, a folder of
  four photos and one truncated JPEG, and `blip-jax demo` serving them on a free port."""
  d = tmp_path_factory.mktemp("demo")
  tok = BertTokenizer(vocab_path)
  for kind, seed in (("pretrain", 0), ("vqa", 1)):
    cfg = tiny_config(kind, image_size=32)
    blip_jax.BlipModel(cfg, init_params(cfg, jax.random.PRNGKey(seed)), {}, tok).save(str(d / kind))
  (d / "photos").mkdir()
  for name in PHOTOS:
    shutil.copy(os.path.join(COCO, "images", name), d / "photos" / name)
  shutil.copy(os.path.join(ODD, "truncated_jpeg.jpg"), d / "photos" / "truncated.jpg")
  port = free_port()
  env = one_device_env() | {"BLIP_JAX_CACHE": str(d / "cache")}
  server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "blip-jax"), "demo", "--caption",
                             str(d / "pretrain"), "--vqa", str(d / "vqa"), "--images", str(d / "photos"),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    wait_http(f"http://127.0.0.1:{port}/", 300, server)
    yield d, f"http://127.0.0.1:{port}/", server, env
  finally:
    server.terminate()
    server.wait(20)


def test_demo_page_in_a_browser(demo, tmp_path, monkeypatch):
  d, url, server, env = demo
  from blip_jax.demo import DemoModels
  monkeypatch.setenv("BLIP_JAX_CACHE", env["BLIP_JAX_CACHE"])
  logs = []
  ref = DemoModels(str(d / "pretrain"), vqa=str(d / "vqa"), images=str(d / "photos"), log=logs.append)
  # the server indexed the folder; this second index read every feature from its cache
  assert "0 encoded now, 4 from the cache, 1 undecodable skipped" in logs[0], logs
  photo = os.path.join(COCO, "images", "COCO_val2014_000000006921.jpg")
  with open(photo, "rb") as f:
    uid = ref.add_upload(f.read())
  want = ref.captions(uid)
  texts = ["a man riding a horse", "a plate of food on a table"]
  want_scores = ref.scores(uid, texts)
  want_answer = ref.answer(uid, "what is in the picture?")
  want_search = [r["name"] for r in ref.search("a dog on the grass")]
  assert len(want["beam"]) == 3 and len(want["nucleus"]) == 3 and sorted(want_search) == sorted(PHOTOS)

  with Browser() as b:
    b.get(url)
    assert "BLIP demo" in b.text("h1")
    b.send_keys("#file", photo)
    b.wait("return document.getElementById('beam').dataset.state === 'done'", what="the captions")
    assert b.texts("#beam li") == want["beam"]
    assert b.texts("#nucleus li") == want["nucleus"]
    assert b.js("return document.getElementById('preview').naturalWidth") > 0  # the upload is shown back
    b.send_keys("#texts", "\n".join(texts))
    b.click("#score")
    b.wait("return document.querySelectorAll('#scores tr').length === 3", what="the scores")
    rows = [r.split("\t") if "\t" in r else r.rsplit(" ", 2) for r in b.texts("#scores tr")[1:]]
    assert [(t, float(itm), float(itc)) for t, itm, itc in rows] == [
        (s["text"], round(s["itm"], 4), round(s["itc"], 4)) for s in want_scores]
    b.send_keys("#question", "what is in the picture?")
    b.click("#ask")
    b.wait("return document.getElementById('answer').textContent.length > 0", what="the answer")
    assert b.text("#answer") == want_answer
    b.send_keys("#query", "a dog on the grass")
    b.click("#search")
    b.wait("return document.querySelectorAll('#results img').length === 4", what="the search results")
    assert b.js("return [...document.querySelectorAll('#results img')].map(i => i.alt)") == want_search
    b.wait("return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
           what="the thumbnails")
    shot = tmp_path / "demo.png"
    b.screenshot(str(shot))
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") >= 800  # width
    assert len(png) > 20_000  # a rendered page with photos, not a blank one

    # an undecodable upload: an error in the page, the captions cleared, the server still up
    b.send_keys("#file", os.path.join(ODD, "truncated_jpeg.jpg"))
    b.wait("return document.getElementById('beam').dataset.state === 'error'", what="the upload error")
    assert "truncated_jpeg.jpg is not an image that can be decoded" in b.text("#error")
    assert b.texts("#beam li") == []
    assert server.poll() is None
    b.send_keys("#file", photo)
    b.wait("return document.getElementById('beam').dataset.state === 'done'", what="captions after the error")
    assert b.texts("#beam li") == want["beam"] and b.text("#error") == ""
