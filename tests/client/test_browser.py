"""The browser page (client/web/) against a real server on loopback, driven by Playwright in Debian's Chromium.

The page is read through the hooks it exposes for this: `window.worldserve.state` and the `data-value` of each HUD
field. The engine's `step` is wrapped to record the keys each frame was made under, so that a test sees a key
reach the world, not only the socket. Without /usr/bin/chromium (scripts/setup_env.sh installs it when run as
root) or without client/web/node_modules (`npm ci --prefix client/web`) the browser tests skip themselves; the
protocol mirror check needs neither.
"""

from __future__ import annotations

import asyncio
import re
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from engine import WorldEngine
from server.game_worlds import GameWorlds
from server.protocol import CLIENT_TYPES, FATAL, RECONNECT, ClientMessage, CloseCode, ErrorCode, ServerMessage
from tests.conftest import write_config
from tests.server.conftest import DEFAULT_CONFIG, run_server

WEB = Path(__file__).resolve().parents[2] / "client" / "web"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests may run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WIDE = {"width": 1280, "height": 720}
PHONE = {"width": 390, "height": 844}
ALL_ATTENTION = ["dense", "window", "tempcache", "tempcache+annsa+annca"]

if not CHROMIUM.exists():
    MISSING = "no Chromium at /usr/bin/chromium: apt-get install chromium (scripts/setup_env.sh does, as root)"
elif not (WEB / "node_modules" / "@msgpack" / "msgpack").is_dir():
    MISSING = "no client/web/node_modules: npm ci --prefix client/web (scripts/setup_env.sh does, given npm)"
else:
    MISSING = ""
browser_test = pytest.mark.skipif(bool(MISSING), reason=MISSING)


# ---- the protocol mirror (no browser)


def js_table(source: str, name: str) -> dict[str, str]:
    """`export const NAME = Object.freeze({KEY: value, ...})` of protocol.js as {KEY: value source text}."""
    match = re.search(rf"export const {name} = Object\.freeze\(\{{(.*?)\}}\);", source, re.S)
    assert match, f"protocol.js has no table {name}"
    return dict(re.findall(r"^\s*(\S+?):\s*(.+?),?$", match.group(1), re.M))


def js_list(source: str, name: str) -> list[str]:
    match = re.search(rf"export const {name} = Object\.freeze\(\[(.*?)\]\);", source, re.S)
    assert match, f"protocol.js has no list {name}"
    return re.findall(r'"(\w+)"', match.group(1))


def test_protocol_js_mirrors_server_protocol() -> None:
    source = (WEB / "protocol.js").read_text()
    server_types = {model.model_fields["type"].default for model in typing.get_args(ServerMessage)}

    assert set(js_list(source, "CLIENT_TYPES")) == set(CLIENT_TYPES)
    assert set(js_list(source, "SERVER_TYPES")) == server_types
    for model in typing.get_args(typing.get_args(ClientMessage)[0]):  # one builder per client message type
        kind = model.model_fields["type"].annotation.__args__[0]
        builder = re.search(rf'return \{{\s*type: "{kind}",?(.*?)\}};\n', source, re.S)
        assert builder, f"protocol.js builds no {kind} message"
        missing = set(model.model_fields) - {"type"} - set(re.findall(r"\b(\w+)\b", builder.group(1)))
        assert not missing, f"the {kind} builder of protocol.js has no {sorted(missing)}"
    for kind in server_types:  # every server message is handled by the connection
        assert f'case "{kind}":' in (WEB / "connection.js").read_text(), f"connection.js does not handle {kind}"

    errors = js_table(source, "ErrorCode")
    assert errors == {code.name: f'"{code.value}"' for code in ErrorCode}
    closes = js_table(source, "CloseCode")
    assert closes == {code.name: str(int(code)) for code in CloseCode}
    reconnect = js_table(source, "RECONNECT")
    expected = {f"[CloseCode.{code.name}]": f'"{advice}"' for code, advice in RECONNECT.items()}
    assert {key: value for key, value in reconnect.items() if key.startswith("[CloseCode.")} == expected
    assert (reconnect["[MESSAGE_TOO_BIG]"], reconnect["[SERVICE_RESTART]"]) == ('"resume"', '"later"')  # §6
    fatal = js_table(source, "FATAL")
    assert fatal == {f"[ErrorCode.{error.name}]": f"CloseCode.{close.name}" for error, close in FATAL.items()}
    assert "export const PROTOCOL_VERSION = 1;" in source


# ---- helpers


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml")


@pytest.fixture
def applied_keys(monkeypatch: pytest.MonkeyPatch) -> list[frozenset[str]]:
    """The keys of every action the engine stepped a world with, in order (appended on the engine thread)."""
    seen: list[frozenset[str]] = []
    step = WorldEngine.step

    def recording_step(self: WorldEngine, worlds: Any, actions: Any) -> Any:
        for entry in actions:
            seen.extend(action.keys for action in (entry if isinstance(entry, list | tuple) else [entry]))
        return step(self, worlds, actions)

    monkeypatch.setattr(WorldEngine, "step", recording_step)
    return seen


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Any, url: str, viewport: dict[str, int] = WIDE) -> Any:
    """A page in its own context (so its own sessionStorage); `page.script_errors` collects uncaught errors."""
    context = await browser.new_context(viewport=viewport)
    page = await context.new_page()
    page.script_errors = []
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    await page.goto(url)
    return page


async def state(page: Any) -> dict[str, Any]:
    return await page.evaluate("() => ({...window.worldserve.state})")


async def until(page: Any, condition: str, arg: Any = None, timeout_s: float = 30.0) -> None:
    """Wait until the JS expression `condition` holds; in it, `s` is the page state and `hud(name)` the raw value
    of a HUD field (refreshed four times a second)."""
    await page.wait_for_function(
        f"""(arg) => {{
            const s = window.worldserve?.state;
            const hud = (name) => document.querySelector(`[data-hud="${{name}}"]`).dataset.value;
            return Boolean(s && ({condition}));
        }}""",
        arg=arg,
        timeout=timeout_s * 1000,
    )


async def hud(page: Any, name: str) -> str:
    return await page.get_attribute(f'[data-hud="{name}"]', "data-value")


async def hud_number(page: Any, name: str, timeout_s: float = 5.0) -> int:
    """A HUD value as a number, once the HUD has shown one (it redraws every 250 ms, not on every frame)."""
    async with asyncio.timeout(timeout_s):
        while (value := await hud(page, name)) is None:
            await asyncio.sleep(0.05)
    return int(value)


async def eventually(check: Any, timeout_s: float = 20.0) -> None:
    """Wait until `check()`, a condition on the server side, holds."""
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.02)


async def frames_stop(page: Any, quiet_s: float = 1.0, timeout_s: float = 20.0) -> int:
    """Wait until no frame has arrived for `quiet_s`; returns the number of frames received."""
    before = -1
    async with asyncio.timeout(timeout_s):
        while (received := (await state(page))["framesReceived"]) != before:
            before = received
            await asyncio.sleep(quiet_s)
    return received


async def canvas_pixels(page: Any, canvas: str = "screen") -> list[int]:
    """An 8x8 grid of the RGB values of the canvas with id `canvas` (what was drawn last)."""
    return await page.evaluate(
        """(id) => {
            const c = document.getElementById(id);
            const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            const out = [];
            for (let y = 0; y < 8; y++) for (let x = 0; x < 8; x++) {
                const i = (Math.floor((y + 0.5) * c.height / 8) * c.width + Math.floor((x + 0.5) * c.width / 8)) * 4;
                out.push(data[i], data[i + 1], data[i + 2]);
            }
            return out;
        }""",
        canvas,
    )


# ---- the page


@browser_test
async def test_page_draws_frames_and_input_reaches_the_world(
    tiny_config_file: Path, applied_keys: list[frozenset[str]]
) -> None:
    async with run_server(None, tiny_config_file) as server, chromium() as browser:
        page = await open_page(browser, f"{server.http}/")
        await until(page, "s.connection === 'open' && s.framesShown >= 3")
        pixels = await canvas_pixels(page)
        assert len(set(pixels)) > 1, "the canvas is blank"
        assert await page.get_attribute("#screen", "data-frame-width") == "16"  # the page took the server's size
        keys = await page.eval_on_selector_all(".key", "buttons => buttons.map(b => b.dataset.code)")
        assert keys == list(server.state.engines["dense"].action_space.keys), "the legend is the announced spec"

        first = await hud_number(page, "frame")
        await page.keyboard.down("KeyW")
        await eventually(lambda: any("KeyW" in keys for keys in applied_keys))
        await until(page, "s.framesShown >= arg", (await state(page))["framesShown"] + 5)
        assert await page.get_attribute('.key[data-code="KeyW"]', "class") == "key held"
        assert await canvas_pixels(page) != pixels, "the frames did not change"
        await until(page, "Number(hud('frame')) > arg", first + 3)
        await until(page, "Number(hud('latency')) > 0")  # input to frame, from the echoed timestamp
        await page.keyboard.up("KeyW")

        # A quick tap, pressed and released between two frames, still reaches the world (both changes are sent).
        sent = (await state(page))["lastSeqSent"]
        await page.keyboard.down("KeyD")
        await page.keyboard.up("KeyD")
        assert (await state(page))["lastSeqSent"] == sent + 2
        await eventually(lambda: any("KeyD" in keys for keys in applied_keys))

        # The legend's keys work as on-screen keys (touch screens): hold one, and the world sees its key.
        await page.hover('.key[data-code="Space"]')
        await page.mouse.down()
        await eventually(lambda: any("Space" in keys for keys in applied_keys))
        await page.mouse.up()
        for name in ("fps", "step", "encode", "queue", "cache", "dropped", "attention", "session", "rtt"):
            assert await hud(page, name), f"the HUD shows no {name}"

        # Leaving the page closes with 1000: the world is freed at once instead of waiting for a resume.
        await page.goto("about:blank")
        await eventually(lambda: not server.state.manager.sessions)
        assert page.script_errors == []


@browser_test
async def test_attention_switch_reaches_the_server(tiny_config_file: Path) -> None:
    async with run_server(None, tiny_config_file, attention_presets=ALL_ATTENTION) as server, chromium() as browser:
        page = await open_page(browser, f"{server.http}/")
        await until(page, "s.connection === 'open' && s.framesShown >= 2")
        labels = await page.eval_on_selector_all("#attention option", "options => options.map(o => o.textContent)")
        assert labels == ["Dense", "Window", "TempCache", "TempCache+AnnSA+AnnCA"]

        await page.select_option("#attention", "window")
        await until(page, "s.attention === 'window' && hud('attention') === 'window'")  # frames of the new maker
        assert await page.text_content('[data-hud="attention"]') == "Window"
        (session,) = server.state.manager.sessions.values()
        assert session.attention == "window"

        await page.select_option("#attention", "tempcache+annsa+annca")
        await until(page, "hud('attention') === 'tempcache+annsa+annca'")
        assert await page.text_content('[data-hud="attention"]') == "TempCache+AnnSA+AnnCA"
        assert page.script_errors == []


@browser_test
async def test_controls_reach_the_server_and_a_clip_downloads(tiny_config_file: Path, tmp_path: Path) -> None:
    async with run_server(None, tiny_config_file) as server, chromium() as browser:
        page = await open_page(browser, f"{server.http}/")
        await until(page, "s.connection === 'open' && s.framesShown >= 2")
        (session,) = server.state.manager.sessions.values()

        await page.fill("#prompt", "a red room")
        await page.press("#prompt", "Enter")
        await eventually(lambda: session.prompt == "a red room")

        await page.fill("#seed", "123")
        await page.click("#reset")
        await eventually(lambda: session.seed == 123)
        await until(page, "hud('seed') === '123'")

        await page.click("#pause")
        await eventually(lambda: session.paused)
        assert await page.text_content("#pause") == "Resume"
        received = await frames_stop(page)  # after the frames already on their way
        await page.click("#pause")
        await eventually(lambda: not session.paused)
        await until(page, "s.framesReceived > arg + 2", received)

        await page.click("#record")
        await page.wait_for_timeout(1200)
        async with page.expect_download() as download_info:
            await page.click("#record")
        download = await download_info.value
        assert re.fullmatch(rf"worldserve-{session.id}-\d{{8}}-\d{{6}}\.webm", download.suggested_filename)
        await download.save_as(tmp_path / download.suggested_filename)
        assert (tmp_path / download.suggested_filename).read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # WebM (EBML)
        assert page.script_errors == []


@browser_test
async def test_compare_with_the_game_steps_the_game_with_each_model_frames_input(
    tiny_config_file: Path, applied_keys: list[frozenset[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    game_keys: list[frozenset[str]] = []
    step = GameWorlds.step

    def recording_step(self: GameWorlds, worlds: Any, actions: Any) -> Any:
        game_keys.extend(action.keys for action in actions)
        return step(self, worlds, actions)

    monkeypatch.setattr(GameWorlds, "step", recording_step)
    async with run_server(None, tiny_config_file) as server, chromium() as browser:
        page = await open_page(browser, f"{server.http}/?seed=5&prompt=an%20icy%20cave")
        await until(page, "s.connection === 'open' && s.framesShown >= 2")
        assert not await page.is_visible("#game-screen"), "off by default"
        (model,) = server.state.manager.sessions.values()

        await page.check("#compare")
        await until(page, "s.game.connection === 'open' && s.game.framesShown >= 2 && hud('game_frame') !== ''")
        assert len(set(await canvas_pixels(page, "game-screen"))) > 1, "the game's canvas is blank"
        (game,) = [s for s in server.state.manager.sessions.values() if s.attention == "game"]
        assert game.mode == "lockstep" and (game.seed, game.prompt) == (model.seed, model.prompt) == (5, "an icy cave")
        assert await page.get_attribute("#game-screen", "data-frame-width") == "16"

        model_first, game_first = await hud_number(page, "frame"), await hud_number(page, "game_frame")
        await page.keyboard.down("KeyW")
        await eventually(lambda: any("KeyW" in keys for keys in applied_keys))
        await eventually(lambda: any("KeyW" in keys for keys in game_keys))
        await until(
            page,
            "Number(hud('frame')) > arg[0] + 2 && Number(hud('game_frame')) > arg[1] + 2",
            [model_first, game_first],
        )
        await page.keyboard.up("KeyW")
        assert (await state(page))["game"]["lastSeqSent"] >= 2  # its own seq: one step per model frame
        await page.click("#pause")
        # once the steps in flight are done, the game's steps applied the inputs of the model's latest frames
        await eventually(lambda: game_keys and game_keys == applied_keys[-len(game_keys) :])
        await page.click("#pause")  # resume

        await page.fill("#seed", "9")
        await page.click("#reset")  # reset applies to both
        await eventually(lambda: model.seed == 9 and game.seed == 9)
        await page.fill("#prompt", "a red room")
        await page.press("#prompt", "Enter")  # so does a new prompt
        await eventually(lambda: model.prompt == game.prompt == "a red room")
        await page.click("#pause")
        await eventually(lambda: model.paused and not game.paused)  # the game steps only when a model frame arrives
        # both began the new world at the game's start view and stepped together: frame for frame, the same index
        await until(page, "s.frameIndex >= 9 && s.game.frameIndex === s.frameIndex")
        await page.click("#pause")
        await eventually(lambda: not model.paused)

        await page.uncheck("#compare")  # closes with 1000: the game session ends at once
        await eventually(lambda: list(server.state.manager.sessions.values()) == [model])
        assert not await page.is_visible("#game-screen")
        assert (await state(page))["game"]["connection"] == "closed"
        assert page.script_errors == []


@browser_test
async def test_page_resumes_after_a_drop_and_reconnects_after_a_server_restart(
    tiny_config_file: Path, unused_tcp_port: int
) -> None:
    port = unused_tcp_port
    async with chromium() as browser:
        async with run_server(None, tiny_config_file, port=port, shutdown_grace_s=1.0) as server:
            page = await open_page(browser, f"{server.http}/")
            await until(page, "s.connection === 'open' && s.framesShown >= 2")
            first = await state(page)

            # A dropped connection (any close but 1000) resumes the same world.
            await page.evaluate("window.worldserve.connection.ws.close(4999)")
            await until(page, "s.sessions === 2 && s.connection === 'open'")
            resumed = await state(page)
            assert resumed["resumed"] and resumed["sessionId"] == first["sessionId"]

        # The server went away (shutting_down, 4012): the page says so and keeps trying with a fresh hello.
        await until(page, "s.closes.some(c => c.error === 'shutting_down')")
        close = next(c for c in (await state(page))["closes"] if c["error"] == "shutting_down")
        assert (close["code"], close["advice"]) == (4012, "later")

        async with run_server(None, tiny_config_file, port=port) as server:
            await until(page, "s.connection === 'open' && s.sessions === 3")
            after = await state(page)
            assert not after["resumed"] and after["sessionId"] != first["sessionId"]
            await until(page, "s.framesShown >= arg", after["framesShown"] + 3)
            assert len(server.state.manager.sessions) == 1
        assert page.script_errors == []


@browser_test
async def test_page_explains_a_bad_token_and_a_full_server(tiny_config_file: Path) -> None:
    async with run_server(None, tiny_config_file, token="s3cret", max_sessions=1) as server, chromium() as browser:
        page = await open_page(browser, f"{server.http}/?token=wrong")
        await until(page, "s.connection === 'stopped'")
        assert (await state(page))["message"]["code"] == "bad_token"
        assert "token" not in page.url, "the token stays out of the address bar"
        assert await page.is_visible("#token-form")
        await page.fill("#token", "s3cret")
        await page.press("#token", "Enter")
        await until(page, "s.connection === 'open' && s.framesShown >= 1")
        assert not await page.is_visible("#token-form")

        other = await open_page(browser, f"{server.http}/?token=s3cret")
        await until(other, "s.message?.code === 'server_full'")
        assert (await state(other))["connection"] != "open"
        assert "full" in await other.text_content("#message")


OVERLAPS = """() => {
    const selector = "#screen, #game-screen, .pane-label, .bar, #hud, .row > :not(.sr-only), .key, #mouse-note";
    const boxes = [...document.querySelectorAll(selector)]
        .filter(el => el.offsetParent !== null)
        .map(el => [el.id || el.className || el.tagName, el.getBoundingClientRect()]);
    const bad = [];
    for (const [name, r] of boxes) if (r.left < 0 || r.right > innerWidth + 0.5) bad.push(name);
    for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
        const [a, r] = boxes[i], [b, q] = boxes[j];
        const w = Math.min(r.right, q.right) - Math.max(r.left, q.left);
        const h = Math.min(r.bottom, q.bottom) - Math.max(r.top, q.top);
        if (w > 0.5 && h > 0.5) bad.push(`${a} / ${b}`);
    }
    return bad;
}"""  # the names of the visible elements that leave the view sideways or overlap another


@browser_test
async def test_screenshots_at_1280x720_and_phone_size_without_overlaps(tmp_path: Path) -> None:
    """The default model's 64x64 frames at 1280x720 (docs/images/browser.png is a copy of this screenshot) and
    on a phone-sized view: every control inside the view, none over another."""
    async with run_server(None, DEFAULT_CONFIG, attention_presets=ALL_ATTENTION) as server, chromium() as browser:
        for name, viewport in (("browser", WIDE), ("browser-phone", PHONE)):
            page = await open_page(browser, f"{server.http}/?prompt=red%20brick%20dungeon&seed=7", viewport)
            await until(page, "s.connection === 'open' && s.framesShown >= 15", timeout_s=60)  # a steady HUD
            await page.keyboard.down("KeyW")  # a latency sample for the HUD
            await until(page, "s.latencyMs !== null", timeout_s=60)
            await page.keyboard.up("KeyW")
            await page.wait_for_timeout(600)  # the HUD refreshes every 250 ms
            assert len(set(await canvas_pixels(page))) > 1, "the canvas is blank"
            overlaps = await page.evaluate(OVERLAPS)
            assert overlaps == [], f"{name}: overlapping or cut-off elements {overlaps}"
            assert await page.evaluate("document.documentElement.scrollWidth <= innerWidth")
            await page.screenshot(path=tmp_path / f"{name}.png", full_page=True)

            # Compare with the game: the game's view beside the model's (below it on the phone), still no overlaps.
            await page.check("#compare")
            await until(page, "s.game.framesShown >= 3 && hud('game_frame') !== ''", timeout_s=60)
            # Reset puts both in a new world of seed 7: both begin at the game's start view, and the game takes a
            # step per model frame, so once the game has answered the model's latest frame both show one index
            before = await hud_number(page, "frame")
            await page.click("#reset")
            await until(page, "Number(hud('frame')) < arg", before, timeout_s=60)  # the new world's frames
            await until(page, "Number(hud('frame')) >= 10 && hud('game_frame') === hud('frame')", timeout_s=60)
            assert len(set(await canvas_pixels(page, "game-screen"))) > 1, "the game's canvas is blank"
            overlaps = await page.evaluate(OVERLAPS)
            assert overlaps == [], f"{name} comparing: overlapping or cut-off elements {overlaps}"
            assert await page.evaluate("document.documentElement.scrollWidth <= innerWidth")
            model, game = [await page.locator(f"#{id}").bounding_box() for id in ("screen", "game-screen")]
            assert min(model["width"], model["height"], game["width"], game["height"]) > 150
            if viewport is WIDE:
                assert game["x"] >= model["x"] + model["width"] and game["y"] == model["y"], "side by side"
            else:
                assert game["y"] >= model["y"] + model["height"] and game["x"] == model["x"], "one below the other"
            await page.screenshot(path=tmp_path / f"{name}-compare.png", full_page=True)
            assert page.script_errors == []
    assert (tmp_path / "browser.png").stat().st_size > 10_000
