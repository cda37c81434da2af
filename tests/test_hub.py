"""Checkpoints by name (checkpoints/hub.py) against a local HTTP server on 127.0.0.1, never the
internet: a transfer cut off mid-way is resumed from the exact byte (HTTP Range), as is a `.part`
left by a killed run; a corrupt transfer (a flipped byte: zip CRC-32, or the server's MD5) is fetched
again and a file that stays corrupt is never returned; a cached file damaged later is fetched again
by `blip_jax.load`; official names load and caption through the CLI; Salesforce/... ids go through
huggingface_hub (a local endpoint, then its offline mode); `blip-jax checkpoints` lists names, sizes
and what is cached."""
import base64
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import COCO, one_device_env

import blip_jax
from blip_jax.checkpoints import hub


class Files(http.server.ThreadingHTTPServer):
  """Serves `files` {url path: bytes} with Range support. `cut[path] = n`: the next n GETs send half
  the bytes then close (announcing the full length); `corrupt[path] = n`: the next n GETs send one
  byte flipped; `md5`: announce GCS's x-goog-hash. `log`: (method, path, Range header)."""

  def __init__(self):
    self.files, self.cut, self.corrupt, self.log, self.md5 = {}, {}, {}, [], False
    self.hf_commit = "0123456789abcdef0123456789abcdef01234567"
    super().__init__(("127.0.0.1", 0), Handler)
    threading.Thread(target=self.serve_forever, daemon=True).start()

  @property
  def url(self):
    return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
  def log_message(self, *a):
    pass

  def _lookup(self):
    path = self.path.split("?")[0]
    if "/resolve/" in path:  # the transformers hub's layout: /{repo}/resolve/{revision}/{file}
      repo, rest = path.split("/resolve/", 1)
      path = repo + "/" + rest.split("/", 1)[1]
    return path, self.server.files.get(path)

  def _headers(self, data, status, start=0):
    self.send_response(status)
    self.send_header("Content-Length", str(len(data) - start))
    self.send_header("Accept-Ranges", "bytes")
    self.send_header("X-Repo-Commit", self.server.hf_commit)
    self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
    if start:
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    if self.server.md5:
      self.send_header("x-goog-hash", "md5=" + base64.b64encode(hashlib.md5(data).digest()).decode())
    self.end_headers()

  def _not_found(self):
    self.send_response(404)
    self.send_header("Content-Length", "0")
    self.end_headers()

  def do_HEAD(self):
    path, data = self._lookup()
    self.server.log.append(("HEAD", path, None))
    if data is None:
      return self._not_found()
    self._headers(data, 200)

  def do_GET(self):
    path, data = self._lookup()
    rng = self.headers.get("Range")
    self.server.log.append(("GET", path, rng))
    if data is None:
      return self._not_found()
    start = int(rng.split("=")[1].split("-")[0]) if rng else 0
    self._headers(data, 206 if start else 200, start)
    body = data[start:]
    if self.server.corrupt.get(path, 0) > 0:
      self.server.corrupt[path] -= 1
      body = bytearray(body)
      body[len(body) // 2] ^= 0x01
      body = bytes(body)
    if self.server.cut.get(path, 0) > 0:
      self.server.cut[path] -= 1
      self.wfile.write(body[: len(body) // 2])
      self.wfile.flush()
      self.close_connection = True
      return
    self.wfile.write(body)


@pytest.fixture()
def server():
  s = Files()
  yield s
  s.shutdown()
  s.server_close()


@pytest.fixture(scope="module")
def caption_pth(tmp_path_factory):
  """An official-layout caption checkpoint (tiny), as bytes."""
  from official_ref import official_state_dict, shared_pair
  path = tmp_path_factory.mktemp("pth") / "cap.pth"
  torch.save({"model": official_state_dict("keys_official_decoder.txt", *shared_pair())}, path)
  return path.read_bytes()


def gets(server, path):
  return [(m, r) for m, p, r in server.log if p == path and m == "GET"]


def test_cut_transfer_resumes_at_the_exact_byte(server, caption_pth, tmp_path, monkeypatch):
  monkeypatch.setenv("BLIP_JAX_FAST_RETRY", "1")
  server.files["/m.pth"] = caption_pth
  server.cut["/m.pth"] = 1
  dest = str(tmp_path / "m.pth")
  assert hub.fetch(server.url + "/m.pth", dest, progress=False) == dest
  assert open(dest, "rb").read() == caption_pth
  half = len(caption_pth) // 2
  assert gets(server, "/m.pth") == [("GET", None), ("GET", f"bytes={half}-")]
  rec = json.load(open(dest + ".json"))
  assert rec["size"] == len(caption_pth) and rec["md5"] == hashlib.md5(caption_pth).hexdigest()
  assert not os.path.exists(dest + ".part")
  hub.fetch(server.url + "/m.pth", dest, progress=False)  # cached: no request at all
  assert len(gets(server, "/m.pth")) == 2


def test_part_left_by_a_killed_run_is_resumed(server, caption_pth, tmp_path):
  server.files["/m.pth"] = caption_pth
  dest = str(tmp_path / "m.pth")
  with open(dest + ".part", "wb") as f:
    f.write(caption_pth[:12345])
  hub.fetch(server.url + "/m.pth", dest, progress=False)
  assert gets(server, "/m.pth") == [("GET", "bytes=12345-")]
  assert open(dest, "rb").read() == caption_pth


@pytest.mark.parametrize("what", ["zip_crc", "server_md5"])
def test_corrupt_transfer_is_fetched_again(server, caption_pth, tmp_path, monkeypatch, what):
  monkeypatch.setenv("BLIP_JAX_FAST_RETRY", "1")
  # zip_crc: a torch file, no MD5 announced (the member CRCs catch it); server_md5: a text file
  data = caption_pth if what == "zip_crc" else b"".join(b"word%d\n" % i for i in range(5000))
  server.files["/f"] = data
  server.md5 = what == "server_md5"
  server.corrupt["/f"] = 1
  dest = str(tmp_path / "f")
  hub.fetch(server.url + "/f", dest, progress=False)
  assert open(dest, "rb").read() == data
  assert gets(server, "/f") == [("GET", None), ("GET", None)]  # the bad bytes were dropped, not resumed
  # always corrupt: an error, and nothing under the final name
  server.corrupt["/f"] = 99
  dest2 = str(tmp_path / "g")
  with pytest.raises(hub.DownloadError, match="could not be fetched intact"):
    hub.fetch(server.url + "/f", dest2, progress=False, retries=2)
  assert not os.path.exists(dest2) and not os.path.exists(dest2 + ".json")


def test_names_load_caption_and_refetch_a_damaged_cache(server, caption_pth, vocab_path, tmp_path, monkeypatch,
                                                         capsys):
  name = "model_base_caption_capfilt_large"
  server.files[f"/{name}.pth"] = caption_pth
  server.files["/bert-base-uncased/vocab.txt"] = open(vocab_path, "rb").read()
  monkeypatch.setenv("BLIP_JAX_MIRROR", server.url)
  monkeypatch.setenv("BLIP_JAX_CACHE", str(tmp_path / "cache"))
  local = tmp_path / "local.pth"
  local.write_bytes(caption_pth)
  want = blip_jax.load(str(local), vocab=vocab_path)
  got = blip_jax.load(name)
  assert got.config == want.config and got.tokenizer.vocab_size == want.tokenizer.vocab_size
  np.testing.assert_array_equal(flat(got), flat(want))
  cached = hub.official_path(name)
  assert cached.startswith(str(tmp_path / "cache")) and hub.is_cached(cached)
  # the CLI by name: caption a photo
  from blip_jax.cli import main
  photo = os.path.join(COCO, "images", "COCO_val2014_000000006921.jpg")
  main(["caption", "--model", name, "--quiet", "--max-length", "8", photo])
  assert capsys.readouterr().out.startswith(photo + "\t")
  main(["convert", name, str(tmp_path / "converted")])  # convert takes names too (vocab included)
  assert "wrote" in capsys.readouterr().out
  conv = blip_jax.load(str(tmp_path / "converted"))
  assert conv.tokenizer.vocab_size == want.tokenizer.vocab_size
  np.testing.assert_array_equal(flat(conv), flat(want))
  assert len(gets(server, f"/{name}.pth")) == 1  # fetched once, then read from the cache
  # damaged in the cache since: same size, one byte flipped -> fetched again, never loaded
  data = bytearray(open(cached, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(cached, "wb").write(bytes(data))
  again = blip_jax.load(name)
  assert open(cached, "rb").read() == caption_pth and len(gets(server, f"/{name}.pth")) == 2
  np.testing.assert_array_equal(flat(again), flat(want))
  # truncated in the cache: its size no longer matches the record -> fetched again
  open(cached, "wb").write(caption_pth[:1000])
  blip_jax.load(name)
  assert open(cached, "rb").read() == caption_pth and len(gets(server, f"/{name}.pth")) == 3
  # the listing marks it cached, and only it
  main(["checkpoints", "--json"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["name"] for r in rows if r["cached"]] == [name]
  assert set(hub.RELEASES) <= {r["name"] for r in rows}


def flat(model):
  """Every parameter value of a model, in tree order, as one vector."""
  import jax
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(model.params)])


def test_release_parameter_counts_are_the_models():
  """The params column of `blip-jax checkpoints`: each release's count is that of the model it
  loads into (our definition at its size and resolution)."""
  from blip_jax.models.config import make_config
  from blip_jax.models.init import param_shapes
  counts = {}
  for r in hub.RELEASES.values():
    key = (r.task, r.vit, r.image_size)
    if key not in counts:
      counts[key] = sum(int(np.prod(s)) for s in param_shapes(make_config(*key)).values())
    assert round(counts[key] / 1e6) == r.params_m, (r.name, counts[key])


def test_unknown_name_and_unreachable_server_are_clear(tmp_path, monkeypatch, capsys):
  from blip_jax.cli import main
  monkeypatch.setenv("BLIP_JAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(SystemExit) as e:
    main(["checkpoints", "--fetch", "model_base_typo"])
  assert e.value.code == 2 and "unknown checkpoint name 'model_base_typo'" in capsys.readouterr().err
  monkeypatch.setenv("BLIP_JAX_MIRROR", "http://127.0.0.1:9")  # nothing listens on the discard port
  monkeypatch.setenv("BLIP_JAX_FAST_RETRY", "1")
  with pytest.raises(SystemExit) as e:
    main(["checkpoints", "--fetch", "model_base_nlvr"])
  err = capsys.readouterr().err
  assert e.value.code == 1 and "could not be fetched intact" in err and "Traceback" not in err


def test_hub_ids_through_huggingface_hub_then_offline(server, tmp_path, vocab_path):
  """A transformers dir served at a local HF_ENDPOINT: loaded by its Salesforce/... id into
  huggingface_hub's cache (HF_HOME), then again with HF_HUB_OFFLINE=1 and the server gone."""
  import jax

  from blip_jax.models.config import tiny_config
  from blip_jax.models.init import init_params
  cfg = tiny_config("caption", image_size=32)
  m = blip_jax.BlipModel(cfg, init_params(cfg, jax.random.PRNGKey(3)), {}, None)
  m.export_hf(str(tmp_path / "hf"))
  repo = "Salesforce/blip-image-captioning-base"
  for f in os.listdir(tmp_path / "hf"):
    server.files[f"/{repo}/{f}"] = (tmp_path / "hf" / f).read_bytes()
  server.files[f"/{repo}/vocab.txt"] = open(vocab_path, "rb").read()
  want = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(m.params)))
  code = ("import blip_jax, jax, numpy as np; m = blip_jax.load(%r); "
          "print('SUM', float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(m.params))), "
          "m.tokenizer.vocab_size)" % repo)
  env = one_device_env() | {"HF_HOME": str(tmp_path / "hf_home"), "HF_ENDPOINT": server.url,
                            "HF_HUB_DISABLE_TELEMETRY": "1"}
  env.pop("HF_HUB_OFFLINE", None)
  online = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert online.returncode == 0, online.stderr[-2000:]
  assert ("GET", f"/{repo}/model.safetensors", None) in server.log
  server.shutdown()
  offline = subprocess.run([sys.executable, "-c", code], env=env | {"HF_HUB_OFFLINE": "1"}, capture_output=True,
                           text=True, timeout=300)
  assert offline.returncode == 0, offline.stderr[-2000:]
  for out in (online, offline):
    total, vocab = out.stdout.split("SUM ")[1].split()
    assert abs(float(total) - want) < 1e-6 * want and int(vocab) == 30524
  empty = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=env | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty")})
  assert empty.returncode != 0 and "not in the Hugging Face cache" in empty.stderr
