"""Opens a page in headless Debian chromium through the DevTools protocol, waits (in real time)
until nothing on it is `aria-busy`, and prints what the playground test checks as JSON.

    python tests/playground/browser.py URL [--screenshot FILE]

Waiting on the page's own busy markers, rather than a fixed delay or chromium's virtual time
(which does not wait for a streamed response body), makes the check deterministic.
"""

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket

STATE = """JSON.stringify({
  busy: document.querySelectorAll('[aria-busy="true"]').length,
  model: document.getElementById("model").textContent,
  variants: [...document.querySelectorAll("#variant option")].map((o) => o.value),
  variant: document.getElementById("variant").value,
  bars: [...document.querySelectorAll(".bar")].map((b) => ({
    label: b.dataset.label, width: b.querySelector(".fill").style.width,
    score: b.querySelector(".score").textContent })),
  entities: [...document.querySelectorAll("mark.entity")].map((m) => ({
    target: m.dataset.target, label: m.dataset.label, text: m.firstChild.textContent })),
  generated: document.getElementById("generated").textContent,
  errors: [...document.querySelectorAll(".error")].map((e) => e.textContent),
})"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--screenshot")
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    profile = tempfile.mkdtemp(prefix="finserve-chromium-")
    browser = subprocess.Popen(
        [shutil.which("chromium") or "chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
         "--hide-scrollbars", "--window-size=1100,720", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ws_url = None
        deadline = time.monotonic() + args.timeout
        while ws_url is None and time.monotonic() < deadline:
            line = browser.stderr.readline()
            if "DevTools listening on" in line:
                ws_url = line.split("listening on ", 1)[1].strip()
        if ws_url is None:
            sys.exit("chromium did not start its DevTools endpoint")
        port = ws_url.split("//", 1)[1].split("/", 1)[0]
        targets = json.load(urllib.request.urlopen(f"http://{port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=args.timeout)
        ids = iter(range(1, 1 << 30))

        def call(method, **params):
            i = next(ids)
            ws.send(json.dumps({"id": i, "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == i:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg["result"]

        call("Page.enable")
        call("Emulation.setDeviceMetricsOverride", width=1100, height=760, deviceScaleFactor=1, mobile=False)
        call("Page.navigate", url=args.url)
        state = None
        while time.monotonic() < deadline:
            time.sleep(0.1)
            result = call("Runtime.evaluate", expression=STATE, returnByValue=True)
            value = result.get("result", {}).get("value")
            if value is None:
                continue
            state = json.loads(value)
            if state["busy"] == 0 and (state["bars"] or state["errors"]):
                break
        else:
            sys.exit(f"the page stayed busy for {args.timeout} s: {state}")
        if args.screenshot:
            shot = call("Page.captureScreenshot", format="png")
            with open(args.screenshot, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
        print(json.dumps(state))
    finally:
        browser.kill()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
