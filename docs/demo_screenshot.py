"""Takes docs/demo.png: runs `blip-jax demo` with the given models, drives the page in headless
Chromium (tests/webdriver.py) through an upload, two scored texts, a question and a search.

  python docs/demo_screenshot.py --caption /tmp/blip_demo/caption/best \
      --retrieval /tmp/blip_demo/retrieval/best --vqa /tmp/blip_demo/vqa/best \
      --images ../shared/data/coco_karpathy_mini/images --photo PHOTO.jpg --out docs/demo.png
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from webdriver import Browser, free_port, wait_http  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  for flag in ("--caption", "--retrieval", "--vqa", "--images", "--photo", "--out"):
    p.add_argument(flag, required=flag in ("--caption", "--photo", "--out"))
  p.add_argument("--texts", default="a man riding a horse\na plate of food on a table")
  p.add_argument("--question", default="what is on the plate?")
  p.add_argument("--query", default="a train at the station")
  a = p.parse_args()
  port = free_port()
  cmd = [os.path.join(os.path.dirname(sys.executable), "blip-jax"), "demo", "--caption", a.caption, "--port", str(port)]
  for flag in ("retrieval", "vqa", "images"):
    if getattr(a, flag):
      cmd += [f"--{flag}", getattr(a, flag)]
  server = subprocess.Popen(cmd)
  try:
    wait_http(f"http://127.0.0.1:{port}/", 600, server)
    with Browser() as b:
      b.get(f"http://127.0.0.1:{port}/")
      b.send_keys("#file", os.path.abspath(a.photo))
      b.wait("return document.getElementById('beam').dataset.state === 'done'", 300)
      if a.retrieval:
        b.send_keys("#texts", a.texts)
        b.click("#score")
        b.wait("return document.querySelectorAll('#scores tr').length > 1")
      if a.vqa:
        b.send_keys("#question", a.question)
        b.click("#ask")
        b.wait("return document.getElementById('answer').textContent.length > 0")
      if a.images:
        b.send_keys("#query", a.query)
        b.click("#search")
        b.wait("return [...document.querySelectorAll('#results img')].length > 0 && "
               "[...document.querySelectorAll('#results img')].every(i => i.complete)")
      b.screenshot(a.out)
      print("captions:", b.texts("#beam li"), b.texts("#nucleus li"))
  finally:
    server.terminate()


if __name__ == "__main__":
  main()
