"""Where the admin token comes from at start (server/http/admin_token.py): no server, only files."""
from __future__ import annotations

import io
import logging
import os
import stat
from pathlib import Path

import pytest

from server.config import Settings
from server.http import admin_token
from server.http.admin_token import AdminTokenError, console_url, prepare, resolve


def settings(data_dir: Path, **kw) -> Settings:
    return Settings(data_dir=data_dir, host=kw.pop("host", "127.0.0.1"), port=kw.pop("port", 8123), **kw)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_run_creates_a_private_token_and_prints_the_page_url(tmp_path):
    data = tmp_path / "data"  # not there yet
    old_umask = os.umask(0)  # the file is 0600 whatever the umask
    try:
        out = io.StringIO()
        got = prepare(settings(data), out=out)
    finally:
        os.umask(old_umask)
    path = data / "admin-token"
    token = path.read_text().strip()
    assert got.admin_token == token and len(token) >= 43 and mode(path) == 0o600
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    line = out.getvalue()
    assert line.count("\n") == 1 and line.endswith(f": http://127.0.0.1:8123/ui/#admin={token}\n")
    assert "created on first run" in line and str(path) in line
    assert [p.name for p in data.iterdir()] == ["admin-token"]  # no temp file left behind

    # later starts: the same token, the line printed again (an operator who lost it finds it in the log)
    out = io.StringIO()
    assert prepare(settings(data), out=out).admin_token == token
    assert out.getvalue().endswith(f"/ui/#admin={token}\n") and "created" not in out.getvalue()
    assert resolve(settings(data)).source == "stored"


def test_every_first_run_gets_its_own_random_token(tmp_path):
    tokens = {resolve(settings(tmp_path / str(i))).token for i in range(5)}
    assert len(tokens) == 5


def test_explicit_token_wins_and_writes_nothing(tmp_path, caplog):
    data = tmp_path / "data"
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="server.http.admin_token"):
        got = prepare(settings(data, admin_token="explicit-secret"), out=out)
    assert got.admin_token == "explicit-secret" and not data.exists() and out.getvalue() == ""
    assert "explicit-secret" not in caplog.text
    # ... also over a stored one, which stays as it was
    stored = resolve(settings(data)).token
    assert resolve(settings(data, admin_token="explicit-secret")).token == "explicit-secret"
    assert (data / "admin-token").read_text().strip() == stored


def test_no_token_for_data_from_before_or_a_shared_database(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "faces.db").write_bytes(b"")  # a data dir an earlier version filled: the admin API stays off
    assert resolve(settings(old)) == admin_token.AdminToken("", "none")
    out = io.StringIO()
    assert prepare(settings(old), out=out).admin_token == "" and out.getvalue() == ""
    assert not (old / "admin-token").exists()
    # replicas on one PostgreSQL database would each make their own: they need FR_ADMIN_TOKEN
    pg = settings(tmp_path / "pg", database_url="postgresql://u:p@127.0.0.1:1/db")
    assert resolve(pg).source == "none" and not (tmp_path / "pg").exists()
    # an operator may enable it by putting a token there
    (old / "admin-token").write_text("my-own-token\n")
    (old / "admin-token").chmod(0o600)
    assert resolve(settings(old)) == admin_token.AdminToken("my-own-token", "stored", old / "admin-token")
    # a fresh SQLite file elsewhere (sqlite:///path) counts as a first run too
    assert resolve(settings(tmp_path / "lite", database_url=f"sqlite:///{tmp_path}/elsewhere.db")).source == "created"


def test_unusable_token_file_stops_the_start(tmp_path, caplog):
    path = tmp_path / "admin-token"
    for bad in ("", "\n", "two words\n"):
        path.write_text(bad)
        with pytest.raises(AdminTokenError, match="one token on one line"):
            resolve(settings(tmp_path))
    path.write_text("readable-by-all\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="server.http.admin_token"):
        assert resolve(settings(tmp_path)).token == "readable-by-all"
    assert "chmod 600" in caplog.text and "readable-by-all" not in caplog.text


def test_a_token_stored_meanwhile_is_kept(tmp_path):
    """Two first starts racing: the file is linked into place, never replaced."""
    path = tmp_path / "admin-token"
    path.write_text("the-first-one\n")
    assert admin_token._create(path) == "the-first-one"
    assert path.read_text() == "the-first-one\n" and [p.name for p in tmp_path.iterdir()] == ["admin-token"]


@pytest.mark.parametrize("host, shown", [
    ("0.0.0.0", "localhost"), ("::", "localhost"), ("", "localhost"), ("127.0.0.1", "127.0.0.1"),
    ("::1", "[::1]"), ("faces.example.org", "faces.example.org"),
])
def test_console_url_names_a_reachable_host(host, shown):
    assert console_url(Settings(host=host, port=9000), "tok") == f"http://{shown}:9000/ui/#admin=tok"


def test_serve_refuses_an_unusable_token_file(tmp_path, capsys, monkeypatch):
    from server.cli import main

    monkeypatch.delenv("FR_ADMIN_TOKEN", raising=False)
    (tmp_path / "admin-token").write_text("")
    assert main(["serve", "--data-dir", str(tmp_path), "--port", "1"]) == 2
    assert "admin token file" in capsys.readouterr().err
