"""Headless Chromium over the DevTools protocol: open a page, collect its errors, evaluate, screenshot.

Why our own small client: the report must be checked offline, in CI, with Debian's `chromium` package only
(no downloaded browser builds, no driver binary). The protocol is JSON over one websocket; `websockets`
is already installed. The browser is started with its own temporary profile and stopped by its pid.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loc2vec.core.atomic import atomic_path
from loc2vec.core.errors import Loc2VecError

log = logging.getLogger(__name__)
CHROMIUM_ENV = "LOC2VEC_CHROMIUM"


class BrowserError(Loc2VecError, RuntimeError):
    """Chromium is missing, did not start, or a page did not get ready in time."""


def chromium_path() -> str:
    """$LOC2VEC_CHROMIUM, else `chromium` (Debian) or `chromium-browser` on PATH."""
    found = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise BrowserError(
            f"Chromium not found: `apt-get install chromium` (scripts/setup_system.sh) or set ${CHROMIUM_ENV}"
        )
    return found


@dataclass
class PageReport:
    """What happened while a page loaded: console errors, failed requests and every requested URL."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    ready: bool = False


class Browser:
    """One headless Chromium with one page, driven over CDP (use as a context manager)."""

    def __init__(self, width: int = 1280, height: int = 900, timeout_s: float = 60.0) -> None:
        self.width, self.height, self.timeout_s = width, height, timeout_s
        self._proc: subprocess.Popen | None = None
        self._profile: str | None = None
        self._ws = None
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> Browser:
        self._profile = tempfile.mkdtemp(prefix="loc2vec-chromium-")
        args = [
            chromium_path(),
            "--headless",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-extensions",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
            "--force-device-scale-factor=1",
            f"--window-size={self.width},{self.height}",
            f"--user-data-dir={self._profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            port = self._wait_for_port()
            self._connect(port)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):  # the browser may already be gone
                self._ws.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)

    def _wait_for_port(self) -> int:
        marker = Path(self._profile or "") / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                err = (self._proc.stderr.read() if self._proc.stderr else b"").decode(errors="replace")[-800:]
                raise BrowserError(f"Chromium exited with status {self._proc.returncode}: {err}")
            if marker.is_file():
                lines = marker.read_text().splitlines()
                if lines and lines[0].strip().isdigit():
                    return int(lines[0])
            time.sleep(0.05)
        raise BrowserError(f"Chromium did not open its DevTools port within {self.timeout_s:g} s")

    def _connect(self, port: int) -> None:
        from websockets.sync.client import connect

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never a proxy
        with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.loads(resp.read())
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise BrowserError("Chromium has no page target")
        self._ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)

    # ---------------------------------------------------------------- protocol

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its result; events received meanwhile are kept in self.events."""
        self._next_id += 1
        msg_id = self._next_id
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout_s
        while True:
            msg = self._receive(deadline - time.monotonic())
            if msg is None:
                raise BrowserError(f"no answer to {method} within {self.timeout_s:g} s")
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        if timeout <= 0:
            return None
        try:
            msg = json.loads(self._ws.recv(timeout=timeout))
        except TimeoutError:
            return None
        if "method" in msg:
            self.events.append(msg)
        return msg

    def pump(self, seconds: float) -> None:
        """Receive events for a while (late console messages, image loads)."""
        deadline = time.monotonic() + seconds
        while self._receive(deadline - time.monotonic()) is not None:
            pass

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise BrowserError(f"JavaScript error in {expression[:60]!r}: {res['exceptionDetails'].get('text')}")
        return res.get("result", {}).get("value")

    # ---------------------------------------------------------------- pages

    def open(self, url: str, ready: str = "document.readyState === 'complete'", settle_s: float = 0.5) -> PageReport:
        """Navigate, wait for the load event and for the `ready` expression, and report what went wrong."""
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.events.clear()
        self.call("Page.navigate", url=url)
        report = PageReport(url=url)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and not any(e["method"] == "Page.loadEventFired" for e in self.events):
            self._receive(0.2)
        while time.monotonic() < deadline:
            if self.evaluate(f"Boolean({ready})"):
                report.ready = True
                break
            self.pump(0.1)
        self.pump(settle_s)
        _collect(self.events, report)
        return report

    def screenshot(self, path: Path, full_page: bool = True, scale: float = 1.0) -> Path:
        """A PNG of the page (its whole height when full_page, scaled by `scale`), written atomically."""
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            width, height = int(size["width"]), int(min(size["height"], 16000))
            self.call(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
            self.pump(0.3)
            params["clip"] = {"x": 0, "y": 0, "width": width, "height": height, "scale": scale}
        data = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        with atomic_path(Path(path)) as tmp:
            tmp.write_bytes(data)
        return Path(path)


def _collect(events: list[dict[str, Any]], report: PageReport) -> None:
    """Console errors, uncaught exceptions, failed or ≥ 400 requests, from the page's CDP events."""
    urls: dict[str, str] = {}
    for e in events:
        method, p = e["method"], e.get("params", {})
        if method == "Network.requestWillBeSent":
            urls[p["requestId"]] = p["request"]["url"]
            report.requests.append(p["request"]["url"])
        elif method == "Network.loadingFailed":
            report.failed_requests.append(f"{urls.get(p['requestId'], '?')}: {p.get('errorText')}")
        elif method == "Network.responseReceived" and int(p["response"].get("status") or 0) >= 400:
            report.failed_requests.append(f"{p['response']['url']}: HTTP {p['response']['status']}")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            report.console_errors.append(f"console.{p['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            report.console_errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            report.console_errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())


def check_page(
    path: Path,
    ready: str = "window.loc2vecMapReady === true",
    screenshot: Path | None = None,
    width: int = 1280,
    scale: float = 1.0,
) -> PageReport:
    """Open a local HTML file headless; optionally screenshot it (full page). The report says what failed."""
    with Browser(width=width) as browser:
        report = browser.open(Path(path).resolve().as_uri(), ready=ready)
        if screenshot is not None:
            browser.screenshot(screenshot, scale=scale)
    return report
