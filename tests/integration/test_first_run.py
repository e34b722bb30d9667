"""First run, end to end: `python -m server serve` on an empty data dir without an admin token, then the
URL it prints, opened in a real headless Chromium, up to a recognized face, with no other command.

The server is a child process (tests/support/local_server.py), exactly as `./dev.sh serve` starts it;
the browser is the system Chromium driven by playwright, as in test_ui.py (and skipped the same way
without it). What the page does is checked against the admin API and the files the server wrote.
"""
from __future__ import annotations

import stat
from pathlib import Path

import httpx

from tests.integration.test_ui import card, drawn, page, playwright_api, screenshot, wait_face_count  # noqa: F401
from tests.support.local_server import LocalServer

ADMIN = "/api/v1/admin/keys"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def server(data_dir: Path, log_path: Path, model_dir: Path, admin_token: str = "") -> LocalServer:
    # FR_ADMIN_TOKEN set to "" is unset; the log lies outside the data dir, which stays empty until the start
    env = {"FR_MODEL_DIR": str(model_dir), "FR_ADMIN_TOKEN": admin_token}
    return LocalServer(data_dir, env=env, log_path=log_path)


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def test_first_run_from_serve_to_a_recognized_face(page, model_dir, facedata, tmp_path):  # noqa: F811
    photos = facedata / "face_recognition" / "examples"
    data, log = tmp_path / "data", tmp_path / "server.log"
    srv = server(data, log, model_dir).start()
    try:
        [url] = srv.console_urls()
        token = url.split("#admin=", 1)[1]
        assert url == f"{srv.base_url}/ui/#admin={token}" and len(token) >= 43
        token_file = data / "admin-token"
        assert token_file.read_text().strip() == token
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

        # every answer the page gets, to check that none of them carries the token
        responses, requests = [], []
        page.on("response", lambda r: responses.append(r))
        page.on("request", lambda q: requests.append(q))
        pg = page
        pg.goto(url)
        pg.wait_for_selector("body[data-ready=true]")
        # the token left the address bar at once, and is kept for this tab only
        assert pg.evaluate("location.href") == f"{srv.base_url}/ui/"
        assert pg.evaluate("sessionStorage.getItem('facerec.adminToken')") == token
        assert pg.evaluate("Object.values(localStorage).join(' ')").find(token) < 0
        assert pg.get_attribute("#admin", "data-state") == "keys" and pg.is_visible("#keys-empty")

        # a recognition key, made on the page: nothing was in use, so the page starts working with it
        pg.select_option("#new-key-type", "recognition")
        pg.fill("#new-key-name", "my first key")
        pg.click("#create-key")
        pg.wait_for_selector('#key-info[data-type="recognition"]')
        [listed] = httpx.get(srv.base_url + ADMIN, headers=bearer(token)).json()["keys"]
        assert listed["type"] == "recognition" and listed["name"] == "my first key"
        assert pg.input_value("#api-key") == listed["key"]
        assert pg.get_attribute(f'#keys tr[data-key="{listed["key"]}"]', "class") == "in-use"
        rkey = listed["key"]

        # keys of the other two services; rename one, use it, revoke it
        for key_type in ("detection", "verification"):
            pg.select_option("#new-key-type", key_type)
            pg.fill("#new-key-name", f"{key_type} key")
            pg.click("#create-key")
            pg.wait_for_selector(f'#keys tr[data-type="{key_type}"]')
        keys = {k["type"]: k for k in httpx.get(srv.base_url + ADMIN, headers=bearer(token)).json()["keys"]}
        assert sorted(keys) == ["detection", "recognition", "verification"]
        assert pg.input_value("#api-key") == rkey  # a key in use stays in use
        vrow = f'#keys tr[data-key="{keys["verification"]["key"]}"]'
        pg.click(f"{vrow} .rename-key")
        pg.fill(f"{vrow} .rename input", "kiosk")
        pg.click(f"{vrow} .rename button[type=submit]")
        pg.wait_for_selector(f'{vrow}[data-name="kiosk"]')
        assert {k["key"]: k["name"] for k in httpx.get(srv.base_url + ADMIN, headers=bearer(token)).json()["keys"]
                }[keys["verification"]["key"]] == "kiosk"
        drow = f'#keys tr[data-key="{keys["detection"]["key"]}"]'
        pg.click(f"{drow} .use")
        pg.wait_for_selector('#key-info[data-type="detection"]')
        pg.click(f"{drow} .revoke")  # confirm() is accepted by the page fixture
        pg.wait_for_selector(drow, state="detached")
        pg.wait_for_selector("#intro")  # the revoked key was in use: the page let go of it
        assert pg.input_value("#api-key") == ""
        remaining = httpx.get(srv.base_url + ADMIN, headers=bearer(token)).json()["keys"]
        assert sorted(k["type"] for k in remaining) == ["recognition", "verification"]

        # back to the recognition key: a subject, an example from a dev photo, then a recognized face
        pg.click(f'#keys tr[data-key="{rkey}"] .use')
        pg.wait_for_selector('#key-info[data-type="recognition"]')
        pg.fill("#new-subject", "Obama")
        pg.click("#add-subject-form button[type=submit]")
        card(pg, "Obama").wait_for()
        card(pg, "Obama").locator("input[type=file]").set_input_files(str(photos / "obama-480p.jpg"))
        wait_face_count(pg, "Obama", 1)
        pg.set_input_files("#file-source", str(photos / "obama-720p.jpg"))
        pg.wait_for_selector("#try[data-state=done]")
        [face] = drawn(pg)
        assert face["subject"] == "Obama" and face["similarity"] > 0.8, face
        screenshot(pg, tmp_path, "ui-first-run.png")

        # the token: in no answer's headers or body, in no request's address (the fragment stays in the
        # browser), and in the log only on the one URL line
        assert len(responses) > 20
        for r in responses:
            assert token not in r.url
            headers = " ".join(f"{k}: {v}" for k, v in r.all_headers().items())
            assert token not in headers, r.url
            try:
                body = r.body()
            except Exception:  # noqa: BLE001 - redirects have no body
                body = b""
            assert token.encode() not in body, r.url
        assert all(token not in q.url for q in requests)
        assert any(q.url.startswith(srv.base_url + ADMIN) for q in requests)
        assert lines_with(srv.log_text(), token) == [line for line in srv.log_text().splitlines() if url in line]
        assert len(lines_with(srv.log_text(), token)) == 1
        assert "admin API disabled" not in srv.log_text()
    finally:
        srv.stop()

    # the second start: the stored token again, its URL printed again; a wrong token is refused
    with server(data, log, model_dir) as again:
        assert again.console_urls() == [url, f"{again.base_url}/ui/#admin={token}"]
        assert len(lines_with(again.log_text(), token)) == 2
        assert httpx.get(again.base_url + ADMIN, headers=bearer(token + "x")).status_code == 401
        assert httpx.get(again.base_url + ADMIN, headers=bearer("wrong")).json()["message"] == "Invalid admin token"
        kept = httpx.get(again.base_url + ADMIN, headers=bearer(token)).json()["keys"]
        assert {k["name"] for k in kept} == {"my first key", "kiosk"}
        # the page without the URL (another origin: nothing kept): the token pasted by hand, a wrong one first
        page.goto(again.base_url + "/ui/")
        page.wait_for_selector("body[data-ready=true]")
        assert page.get_attribute("#admin", "data-state") == "signed-out" and not page.is_visible("#admin-token")
        page.click("#admin > summary")
        page.fill("#admin-token", "wrong")
        page.click("#admin-token-form button[type=submit]")
        page.wait_for_selector('#error[data-status="401"]')
        assert "Invalid admin token" in page.text_content("#error")
        assert page.get_attribute("#admin", "data-state") == "signed-out"
        page.fill("#admin-token", token)
        page.click("#admin-token-form button[type=submit]")
        page.wait_for_selector('#admin[data-state="keys"]')
        assert page.locator("#keys tbody tr").count() == 2
        page.click("#admin-signout")
        assert page.evaluate("sessionStorage.getItem('facerec.adminToken')") is None
    assert token_file.read_text().strip() == token

    # an explicit token wins over the stored one, which is left as it is
    with server(data, log, model_dir, admin_token="explicit-admin-token-1234") as explicit:
        assert len(explicit.console_urls()) == 2  # no new URL line
        assert httpx.get(explicit.base_url + ADMIN, headers=bearer(token)).status_code == 401
        assert httpx.get(explicit.base_url + ADMIN, headers=bearer("explicit-admin-token-1234")).status_code == 200
    assert token_file.read_text().strip() == token
    assert "explicit-admin-token-1234" not in log.read_text()


def test_explicit_token_on_a_first_run_creates_no_file(model_dir, tmp_path):
    data = tmp_path / "data"
    with server(data, tmp_path / "server.log", model_dir, admin_token="explicit-admin-token-5678") as srv:
        assert srv.console_urls() == []
        assert httpx.get(srv.base_url + ADMIN, headers=bearer("explicit-admin-token-5678")).json() == {"keys": []}
        assert httpx.get(srv.base_url + ADMIN, headers=bearer("explicit")).status_code == 401
        assert "explicit-admin-token-5678" not in srv.log_text()
    assert not (data / "admin-token").exists()
