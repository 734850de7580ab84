"""A screenshot of the search page for the README: docs/screenshot.png.

    python benchmarks/screenshot.py                       # tiny test model, 300 photos
    python benchmarks/screenshot.py --model ViT-B-32 --pretrained /models/vit-b-32.pt \\
        --photos 1000 --query "two dogs playing in the snow"
    python benchmarks/screenshot.py --scheme dark --out docs/screenshot-dark.png

Copies the first ``--photos`` Flickr8k photos from ../shared/data/flickr8k-1k into a
temporary folder, indexes them (``Engine.index``, in this process) with ``--model`` /
``--pretrained`` (default: the tiny open_clip model of tests/tinyclip.py, trained
here in seconds -- it only knows coloured shapes, so its ranking of real photos is
arbitrary; give real CLIP weights for a meaningful picture), starts
``python -m mmsearch serve`` on a free loopback port, opens ``/?q=<query>`` in
headless Chromium (Debian's ``chromium``; no browser is downloaded) at 1280x900,
waits for the results and their thumbnails, and saves the viewport as a PNG.
Needs the ``playwright`` Python package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k" / "images"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="open_clip architecture or config JSON (default: the tiny test model)")
    p.add_argument("--pretrained", default=None, help="tag or checkpoint file (with --model)")
    p.add_argument("--photos", type=int, default=300, help="how many Flickr photos to index")
    p.add_argument("--query", default="a dog running on the grass")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=900)
    p.add_argument("--scheme", choices=("light", "dark"), default="light")
    p.add_argument("--chromium", default=os.environ.get("MMSEARCH_CHROMIUM"),
                   help="Chromium binary (default: Debian's /usr/lib/chromium/chromium)")
    return p.parse_args(argv)


def chromium(explicit: str | None) -> str:
    for candidate in (explicit, "/usr/lib/chromium/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    sys.exit("no Chromium found: apt-get install chromium, or pass --chromium")


def model_files(args: argparse.Namespace, work: Path) -> tuple[str, str | None]:
    if args.model is not None:
        return args.model, args.pretrained
    sys.path.insert(0, str(ROOT / "tests"))
    import tinyclip

    print("training the tiny test model ...", flush=True)
    config, checkpoint = tinyclip.train_tiny_clip(work / "tinyclip")
    return str(config), str(checkpoint)


def build_index(args: argparse.Namespace, work: Path) -> Path:
    from mmsearch import Engine

    sources = sorted(FLICKR.glob("*.jpg"))[:args.photos]
    if not sources:
        sys.exit(f"no photos at {FLICKR} (see ../shared/README.md)")
    photos, home = work / "photos", work / "home"
    photos.mkdir()
    for source in sources:
        shutil.copy(source, photos / source.name)
    model, pretrained = model_files(args, work)
    print(f"indexing {len(sources)} photos ...", flush=True)
    with Engine.open("photos", home=home, model=model, pretrained=pretrained) as engine:
        engine.index([photos])
    return home


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mmsearch", "serve", "--home", str(home),
                                 "--index", "photos", "--port", str(port), "--host", "127.0.0.1"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    sys.exit(f"the server did not answer /healthz in 120 s:\n{log.read_text()}")


def shoot(args: argparse.Namespace, url: str) -> list[str]:
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(args.chromium),
                                             headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height},
                                color_scheme=args.scheme)
        page.on("console", lambda m: problems.append(f"{m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
        page.goto(f"{url}/?q={urllib.parse.quote_plus(args.query)}")
        page.wait_for_selector("#results .hit")
        page.wait_for_selector('#results[aria-busy="false"]')
        page.wait_for_selector("#info:has-text('photos')")
        # the thumbnails in view have loaded
        page.wait_for_function("""() => Array.from(document.querySelectorAll('#results img'))
            .filter(img => img.getBoundingClientRect().top < innerHeight)
            .every(img => img.complete && img.naturalWidth > 0)""", timeout=60_000)
        page.mouse.move(0, args.height - 1)  # no hover effects
        page.wait_for_timeout(300)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        browser.close()
    return problems


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmsearch-shot-") as tmp:
        work = Path(tmp)
        home = build_index(args, work)
        proc, url = serve(home, work / "server.log")
        try:
            problems = shoot(args, url)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    for line in problems:
        print(f"page console: {line}", file=sys.stderr)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
