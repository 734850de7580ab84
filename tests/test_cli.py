"""The CLI through Typer's runner: the commands a newcomer types, their output and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import draw_shapes
from typer.testing import CliRunner

import tinyclip
from mmsearch.cli import app

runner = CliRunner()


def run(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


@pytest.fixture
def indexed(home: Path, tiny_model: tuple[Path, Path], tmp_path: Path) -> Path:
    config, ckpt = tiny_model
    folder = tmp_path / "photos"
    draw_shapes(folder, per_combo=2)
    out = run("index", folder, "--model", config, "--pretrained", ckpt)
    assert "added 24" in out and "skipped 0" in out
    return folder


def test_index_then_query_with_no_extra_flags(indexed: Path) -> None:
    out = run("query", "a red circle", "-k", "2")
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all("red_circle_" in line for line in lines)
    assert lines[0].split()[0] == "1"


def test_query_json_image_and_subtree(indexed: Path, tmp_path: Path) -> None:
    hits = json.loads(run("query", "a blue square", "--json", "-k", "3"))
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert set(hits[0]) == {"rank", "score", "id", "path", "taken", "taken_source", "camera_make",
                            "camera_model", "lens", "gps_lat", "gps_lon", "width", "height",
                            "size", "ext", "kind", "time", "start", "end", "video_id"}
    assert (hits[0]["ext"], hits[0]["taken_source"], hits[0]["width"]) == ("png", "mtime", 64)
    assert (hits[0]["kind"], hits[0]["time"], hits[0]["video_id"]) == ("image", None, None)
    probe = tmp_path / "probe.png"
    tinyclip.draw_shape("yellow", "circle", seed=99).save(probe)
    hits = json.loads(run("query", "--image", probe, "--json", "-k", "1"))
    assert "yellow_circle_" in hits[0]["path"]
    hits = json.loads(run("query", "a red circle", "--in", indexed, "--json"))
    assert len(hits) == 10


def test_texts_add_and_query_from_an_image(indexed: Path, tmp_path: Path) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(tinyclip.caption(c, s) for c, s in tinyclip.combos()) + "\n\n")
    assert "added 12" in run("texts", "add", captions)
    assert "unchanged 12" in run("texts", "add", captions)
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text('{"id": "g1", "text": "a green circle"}\n')
    assert "added 1" in run("texts", "add", jsonl)
    probe = indexed / "green_triangle_0.png"
    hits = json.loads(run("query", "--image", probe, "--texts", "--json", "-k", "1"))
    assert hits[0]["text"] == "a green triangle" and set(hits[0]) == {"rank", "score", "id", "key", "text"}


def test_info_remove_and_check(indexed: Path) -> None:
    out = run("info")
    assert "images     24" in out and "tinyclip-test" in out and "catalog.sqlite" in out
    data = json.loads(run("info", "--json"))
    assert data["images"] == 24 and data["dim"] == 64
    assert "ok" in run("check")
    (indexed / "red_circle_0.png").unlink()
    assert "1 indexed files no longer exist" in run("check", code=1)
    assert "repaired" in run("check", "--repair")
    assert "ok" in run("check")
    assert "removed 23 images" in run("remove", indexed)


def test_reindex_summary_and_json(indexed: Path) -> None:
    (indexed / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    data = json.loads(run("index", indexed, "--json"))
    assert (data["added"], data["unchanged"], data["embedded"]) == (0, 24, 0)
    assert [Path(s["path"]).name for s in data["skipped"]] == ["broken.jpg"]
    assert data["skipped"][0]["reason"]


@pytest.mark.parametrize("args, message", [
    (["query", ""], "empty query"),
    (["query", "x", "--index", "nope"], "no index 'nope'"),
    (["query"], "give something to search for"),
    (["query", "-"], "needs a term on both sides"),
    (["query", "beach", "-"], "ends with an operator"),
    (["query", "1.2.3:dog"], "is not a number"),
    (["query", "missing.jpg", "+", "dog"], "no such image file: missing.jpg"),
    (["query", "x", "--after", "July"], "cannot read the date 'July'"),
    (["query", "x", "--after", "2023-02-30"], "cannot read the date"),
    (["query", "x", "--near", "38.7,-9.1"], "--near LAT,LON and --km R go together"),
    (["query", "x", "--near", "north", "--km", "3"], "give LAT,LON"),
    (["query", "x", "--sort", "size"], "--sort 'size'"),
    (["query", "x", "--texts", "--camera", "fuji"], "apply to images"),
    (["query", "id:x"], "id: takes"),
    (["query", "x", "-k", "-1"], "k must be"),
    (["index", "/definitely/not/here"], "no such file or directory"),
    (["info", "--index", "bad/name"], "invalid index name"),
    (["texts", "add", "/no/such.txt"], "no such file"),
])
def test_bad_input_is_one_clear_line(indexed: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


def test_model_mismatch_is_refused(indexed: Path, tiny_config: Path, tmp_path: Path) -> None:
    out = run("index", indexed, "--model", tiny_config, "--pretrained", "none", code=1)
    assert "built with" in out


def test_help_and_import_do_not_load_heavy_libraries() -> None:
    code = ("import sys, mmsearch, mmsearch.cli, mmsearch.engine; "
            "heavy = [m for m in ('torch', 'open_clip', 'faiss') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import sys; from mmsearch.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'open_clip', 'faiss') if m in sys.modules]\n"
            "sys.exit(1 if heavy else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_the_console_script_keeps_exit_codes_and_output(indexed: Path, home: Path) -> None:
    """`mmsearch` as a real process (it ends without tearing torch down once output is flushed)."""
    exe = Path(sys.executable).parent / "mmsearch"
    env = {**os.environ, "MMSEARCH_HOME": str(home)}
    ok = subprocess.run([str(exe), "query", "a red circle", "-k", "2", "--json"], env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and len(json.loads(ok.stdout)) == 2, ok.stderr
    bad = subprocess.run([str(exe), "query", "a red circle", "--index", "nope"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert subprocess.run([str(exe), "--help"], capture_output=True).returncode == 0


def test_offline_first_run_fails_at_once_then_queries_say_the_index_is_empty(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default model is a download; offline (no DNS here, as on a plane) the first
    `index` says so in one line instead of retrying, and `query` answers at once."""
    import socket

    from huggingface_hub import constants

    real = socket.getaddrinfo

    def no_dns(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    photos = tmp_path / "photos"
    draw_shapes(photos, per_combo=1)
    lines = run("index", photos, code=1).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "mmsearch: cannot download weights ViT-B-32 / laion2b_s34b_b79k: huggingface.co is "
        "unreachable"), lines
    assert "--pretrained /path/to/checkpoint.pt" in lines[0]
    out = run("query", "red sports car", code=1)
    assert out.strip() == "mmsearch: index 'default' is empty; run `mmsearch index FOLDER`"


@pytest.mark.parametrize("argv", [
    ["query", "a dog", "--km", "abc"], ["query", "a dog", "-k", "1e999"],
    ["query", "a dog", "--nope"], ["texts", "add"], ["no-such-command"],
    ["index", "--workers", "many", "."], ["serve", "--port", "http"],
])
def test_usage_errors_are_one_line_and_exit_2(argv: list[str]) -> None:
    """Through the console script itself, as a shell runs it."""
    run = subprocess.run([str(Path(sys.executable).parent / "mmsearch"), *argv],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmsearch: ") and "--help" in lines[0], run.stderr
    assert "Traceback" not in run.stderr and not run.stdout
