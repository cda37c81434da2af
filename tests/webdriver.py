"""A minimal W3C WebDriver client (JSON over HTTP to chromedriver) for the demo page's browser test:
Debian's chromium + chromium-driver, headless, no Python package needed. Also used by
docs/demo_screenshot.py."""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Without the background-networking flags Chromium's start-up connections are refused by a closed
# network, many at a time (env notes).
CHROME_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--window-size=1200,1100"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
  end = time.time() + timeout
  while time.time() < end:
    if proc is not None and proc.poll() is not None:
      raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
    try:
      with urllib.request.urlopen(url, timeout=2):
        return
    except (urllib.error.URLError, ConnectionError, OSError):
      time.sleep(0.3)
  raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


class Browser:
  """Headless Chromium through chromedriver. Use as a context manager."""

  def __init__(self):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
      raise RuntimeError(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver "
                         f"(.ci/run installs them)")
    self.port = free_port()
    self.profile = tempfile.mkdtemp(prefix="blip_chromium_")
    self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{self.port}/status", 30, self.driver)
    caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
        "binary": CHROMIUM, "args": CHROME_ARGS + [f"--user-data-dir={self.profile}"]}}}}
    self.session = self._call("POST", "/session", caps)["sessionId"]

  def _call(self, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["value"]
    except urllib.error.HTTPError as e:
      raise RuntimeError(f"webdriver {method} {path}: {e.read()[:500]!r}") from None

  def _s(self, path: str) -> str:
    return f"/session/{self.session}{path}"

  def get(self, url: str) -> None:
    self._call("POST", self._s("/url"), {"url": url})

  def find(self, css: str) -> str:
    return self._call("POST", self._s("/element"), {"using": "css selector", "value": css})[ELEMENT]

  def find_all(self, css: str) -> list[str]:
    return [e[ELEMENT] for e in self._call("POST", self._s("/elements"), {"using": "css selector", "value": css})]

  def send_keys(self, css: str, text: str) -> None:
    self._call("POST", self._s(f"/element/{self.find(css)}/value"), {"text": text})

  def click(self, css: str) -> None:
    self._call("POST", self._s(f"/element/{self.find(css)}/click"), {})

  def text(self, css: str) -> str:
    return self._call("GET", self._s(f"/element/{self.find(css)}/text"))

  def texts(self, css: str) -> list[str]:
    return [self._call("GET", self._s(f"/element/{e}/text")) for e in self.find_all(css)]

  def js(self, script: str, *args):
    return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

  def wait(self, script: str, timeout: float = 120.0, what: str = ""):
    """Polls a JS expression (`return ...`) until it is truthy; returns its value."""
    end = time.time() + timeout
    while time.time() < end:
      v = self.js(script)
      if v:
        return v
      time.sleep(0.25)
    raise TimeoutError(f"page never showed {what or script}")

  def screenshot(self, path: str) -> None:
    with open(path, "wb") as f:
      f.write(base64.b64decode(self._call("GET", self._s("/screenshot"))))

  def close(self) -> None:
    try:
      self._call("DELETE", self._s(""))
    except Exception:  # noqa: BLE001 - closing a browser that already went
      pass
    self.driver.terminate()
    try:
      self.driver.wait(10)
    except subprocess.TimeoutExpired:
      self.driver.kill()
    shutil.rmtree(self.profile, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
