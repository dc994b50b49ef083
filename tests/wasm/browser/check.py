#!/usr/bin/env python3
"""The browser check: serve the page, run headless Chromium on it, wait
for the page's own report.

    check.py DIR [TIMEOUT_SECONDS]

DIR holds index.html and the program the page runs (page.js, page.wasm,
page.worker.js). Every response carries the cross-origin isolation
headers (SharedArrayBuffer needs them). The page tells its result by a
request to /done?result=...; the check ends when that request comes (or
Chromium exits, or TIMEOUT passes: a failure, not a synchronisation).
Exit status: 0 if the page reported "pass", 1 if it reported anything
else or never did, 77 (skipped, for CTest) if there is no Chromium or it
could not start (it exited before it asked for the page).
"""
import http.server
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.parse

SKIP = 77


class State:
    def __init__(self):
        self.done = threading.Event()
        self.result = None
        self.log = ""
        self.page_loaded = False


def make_handler(root, state):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=root, **kwargs)

        def end_headers(self):
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.send_header("Cache-Control", "no-store")
            super().end_headers()

        def report(self):
            url = urllib.parse.urlparse(self.path)
            q = urllib.parse.parse_qs(url.query)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8", "replace")
            self.send_response(204)
            self.end_headers()
            if state.result is None:
                state.result = q.get("result", [""])[0]
                state.log = body
                state.done.set()

        def do_GET(self):
            if self.path.startswith("/done"):
                return self.report()
            if self.path.startswith("/index.html"):
                state.page_loaded = True
            return super().do_GET()

        def do_POST(self):
            if self.path.startswith("/done"):
                return self.report()
            self.send_error(404)

        def log_message(self, fmt, *args):
            pass

    return Handler


def find_chromium():
    for name in ("chromium", "chromium-headless-shell", "chromium-browser",
                 "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def main():
    root = os.path.abspath(sys.argv[1])
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 120.0
    chromium = find_chromium()
    if not chromium:
        print("SKIP: no Chromium (Debian: apt-get install chromium)")
        return SKIP
    state = State()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             make_handler(root, state))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = "http://127.0.0.1:%d/index.html" % server.server_address[1]
    profile = tempfile.mkdtemp(prefix="keel-chromium-")
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
            "--no-first-run", "--disable-extensions",
            "--user-data-dir=" + profile, url]
    # Its own process group: Chromium's helpers end with it.
    browser = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)

    def watch():
        browser.wait()
        state.done.set()

    threading.Thread(target=watch, daemon=True).start()
    state.done.wait(timeout)
    try:
        os.killpg(browser.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    err = browser.communicate()[1].decode("utf-8", "replace")
    server.shutdown()
    shutil.rmtree(profile, ignore_errors=True)
    if state.result is None:
        if not state.page_loaded:
            print("SKIP: Chromium could not start (%s):\n%s"
                  % (chromium, err[-2000:]))
            return SKIP
        print("FAIL: the page never reported (timeout %gs, Chromium %s)"
              % (timeout, "running" if browser.returncode is None
                 else "exited %s" % browser.returncode))
        print(err[-2000:])
        return 1
    print(state.log, end="")
    print("browser check (%s): %s" % (chromium, state.result))
    return 0 if state.result == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
