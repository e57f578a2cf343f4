"""The chat page in headless Chromium (Debian's), driven over the DevTools protocol on a
pipe (--remote-debugging-pipe: NUL-separated JSON on fds 3 and 4, no websocket library):
type a message, press Enter, watch the reply arrive in several pieces, compare it with the
greedy reply the API gives, save a screenshot under test-artifacts/, start over; stop a
reply as it streams; an error leaves no empty reply bubble."""

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import pocketlm
from pocketlm.prompting.chat import Harness
from test_serve_api import MODEL, Server

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
    "--window-size=1000,700",
]


class DevTools:
    """A Chromium child process and a minimal CDP client over its debugging pipe."""

    def __init__(self, url: str, profile: Path) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "Debian's chromium is missing: apt-get install -y chromium"
        to_child, self._to_browser = os.pipe()  # the browser reads commands on fd 3
        self._from_browser, from_child = os.pipe()  # and writes replies on fd 4

        def wire_fds() -> None:
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)  # (closing other fds happens after this: pass_fds keeps 3, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", url],
            preexec_fn=wire_fds,
            pass_fds=(3, 4),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child)
        os.close(from_child)
        self._next_id, self._buffer, self.session = 0, b"", None

    def call(self, method: str, timeout: float = 30.0, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            assert time.monotonic() < deadline, "Chromium did not answer in time"
            self._buffer += os.read(self._from_browser, 1 << 16)
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def attach_to_page(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            pages = [
                t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"
            ]
            if pages:
                break
            assert time.monotonic() < deadline, "no page target"
            time.sleep(0.1)
        target = pages[0]["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def js(self, expression: str):  # noqa: ANN201 - whatever the expression gives
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):  # noqa: ANN201
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)
        return value

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_browser)
        os.close(self._from_browser)


def type_and_press_enter(browser: DevTools, text: str) -> None:
    browser.call("Input.insertText", text=text)
    for kind in ("keyDown", "keyUp"):
        browser.call(
            "Input.dispatchKeyEvent",
            type=kind,
            key="Enter",
            code="Enter",
            windowsVirtualKeyCode=13,
            text="\r" if kind == "keyDown" else "",
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from checkpoints import make_gpt2

    lm = pocketlm.load(make_gpt2(tmp_path_factory.mktemp("tiny"), n_positions=512))
    server = Server(lm, max_batch=4, max_queue=8, timeout=60)
    yield server
    server.close()


def test_chat_page_streams_a_reply(server, tmp_path):
    lm = server.service.lm
    expected = lm.generate(
        Harness().render(system=None, turns=[], message="Hello there"),
        max_tokens=40,
        temperature=0.0,
        stop=["\nUser:"],
    ).text
    browser = DevTools(server.url + "/", tmp_path / "profile")
    try:
        browser.attach_to_page()
        browser.wait_for(
            "document.getElementById('model') && document.getElementById('model').textContent"
        )
        assert browser.js("document.getElementById('model').textContent") == MODEL
        # Set the controls as a user would: temperature 0, 40 tokens; then type and press Enter.
        browser.js("""(() => { const t = document.getElementById('temperature'); t.value = '0';
            t.dispatchEvent(new Event('input')); document.getElementById('max-tokens').value = '40';
            window.pieces = 0;
            new MutationObserver(() => { window.pieces += 1; }).observe(
                document.getElementById('log'), {subtree: true, childList: true, characterData: true});
            document.getElementById('input').focus(); })()""")
        type_and_press_enter(browser, "Hello there")
        browser.wait_for(
            "document.querySelector('.assistant') && document.querySelector('.assistant').dataset.state === 'done'"
        )
        assert browser.js("document.querySelector('.user').textContent") == "Hello there"
        assert browser.js("document.querySelector('.assistant').textContent") == expected
        assert browser.js("document.getElementById('temperature-value').textContent") == "0"
        # Two bubbles appended, then the reply's text replaced once per streamed piece.
        assert browser.js("window.pieces") > 3
        assert browser.js("document.querySelectorAll('.error').length") == 0
        ARTIFACTS.mkdir(exist_ok=True)
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
        (ARTIFACTS / "serve_chat_page.png").write_bytes(base64.b64decode(shot))
        browser.js("document.getElementById('reset').click()")
        assert browser.js("document.getElementById('log').children.length") == 0
    finally:
        browser.close()
    assert (ARTIFACTS / "serve_chat_page.png").stat().st_size > 1000


def test_stop_keeps_the_words_so_far_and_an_error_leaves_no_empty_bubble(server, tmp_path):
    browser = DevTools(server.url + "/", tmp_path / "profile")
    try:
        browser.attach_to_page()
        browser.wait_for("document.getElementById('model')?.textContent")
        # An error: more new tokens than the 512-token window leaves. It is said, and no
        # empty reply bubble is left behind; the message is marked as not answered.
        browser.js("""(() => { const t = document.getElementById('temperature'); t.value = '0';
            t.dispatchEvent(new Event('input'));
            document.getElementById('max-tokens').value = '100000';
            document.getElementById('input').focus(); })()""")
        type_and_press_enter(browser, "Hello there")
        error = browser.wait_for("document.querySelector('.error')?.textContent")
        assert "this model's context is 512" in error
        assert browser.js("document.querySelectorAll('.assistant').length") == 0
        assert browser.js("document.querySelector('.user').classList.contains('unsent')")
        assert browser.js("document.getElementById('stop').hidden && messages.length === 0")
        # Stop, pressed as the first words arrive: they stay as the reply, the conversation
        # goes on from them, and Send is back.
        browser.js("""(() => { document.getElementById('max-tokens').value = '400';
            new MutationObserver(() => {
                const reply = document.querySelector('.assistant');
                if (reply && reply.textContent && !document.getElementById('stop').hidden)
                    document.getElementById('stop').click();
            }).observe(document.getElementById('log'),
                       {subtree: true, childList: true, characterData: true});
            document.getElementById('input').focus(); })()""")
        type_and_press_enter(browser, "Hello there")
        browser.wait_for("document.querySelector('.assistant')?.dataset.state === 'stopped'")
        shown = browser.js("document.querySelector('.assistant').textContent")
        full = server.service.lm.generate(
            Harness().render(system=None, turns=[], message="Hello there"),
            max_tokens=400,
            temperature=0.0,
            stop=["\nUser:"],
        ).text
        assert shown and full.startswith(shown) and len(shown) < len(full)
        assert browser.js("messages.map((m) => m.role + ':' + m.content)") == [
            "user:Hello there",
            "assistant:" + shown,
        ]
        assert browser.js(
            "document.getElementById('stop').hidden && !document.getElementById('send').disabled"
        )
        assert browser.js("document.querySelectorAll('.error').length") == 1  # only the first
    finally:
        browser.close()
