"""Child processes for ``test_reliability.py``: index runs that are killed for real.

    python tests/reliability_child.py serve

imports torch, open_clip, FAISS and mmsearch once (never running a model), then
reads one JSON job per line on stdin and runs each in a process forked from
itself, so a job starts in well under a second instead of paying the imports
again. It prints ``ready`` once, then for each job ``pid N`` when it starts and
``exit N CODE`` when it ends (CODE: the exit status, or minus the signal that
killed it). A job's own output goes to the files named in the job.

A job (JSON object):

``mode``         ``"index"``: ``Engine.open(...).index(folders)``, the report printed as
                 JSON; ``"cli"``: ``mmsearch.cli.main()`` with ``argv``
``home``, ``index``, ``model``, ``pretrained``, ``folders``, ``batch_size``   (mode index)
``argv``         the command line after ``mmsearch`` (mode cli)
``commit_every`` images per catalog transaction (``ingest.COMMIT_EVERY``)
``save_every``   seconds between FAISS saves during a run (``ingest.SAVE_EVERY_S``)
``sleep``        seconds slept before each model batch, to stretch a run out
``die``          ``"HOOK:N"``: SIGKILL itself at the N-th pass through HOOK:
                 ``commit`` (just after a catalog transaction committed),
                 ``faiss-tmp`` (FAISS written to its temporary file, not yet renamed),
                 ``fingerprint`` (FAISS file replaced, its checksum not yet recorded)
``stdout``, ``stderr``  files receiving the job's output
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _imports() -> None:
    import faiss  # noqa: F401
    import numpy  # noqa: F401
    import open_clip  # noqa: F401
    import sqlalchemy  # noqa: F401
    import torch  # noqa: F401
    from PIL import Image  # noqa: F401

    import mmsearch.cli  # noqa: F401
    import mmsearch.engine  # noqa: F401


def _die_at(hook: str, count: int) -> None:
    """Patch the library so the process SIGKILLs itself at the ``count``-th pass through ``hook``."""
    from mmsearch.store.catalog import Catalog

    seen = [0]

    def hit() -> None:
        seen[0] += 1
        if seen[0] == count:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    if hook == "commit":
        original = Catalog.commit_images

        def commit_images(self, *args, **kwargs):
            ids = original(self, *args, **kwargs)
            if args and (args[0] or (len(args) > 1 and args[1])):  # a batch, not a removal
                hit()
            return ids

        Catalog.commit_images = commit_images
    elif hook == "faiss-tmp":
        import faiss

        write_index = faiss.write_index

        def write(index, path, *rest):
            write_index(index, path, *rest)
            hit()

        faiss.write_index = write
    elif hook == "fingerprint":
        set_metas = Catalog.set_metas

        def metas(self, values):
            if any(k.endswith("_file") for k in values):
                hit()
            set_metas(self, values)

        Catalog.set_metas = metas
    else:
        raise SystemExit(f"unknown hook {hook!r}")


def run_job(job: dict) -> int:
    import torch

    from mmsearch.ingest import run as ingest
    from mmsearch.models import Embedder

    torch.set_num_threads(1)
    if "commit_every" in job:
        ingest.COMMIT_EVERY = int(job["commit_every"])
    if "save_every" in job:
        ingest.SAVE_EVERY_S = float(job["save_every"])
    if job.get("sleep"):
        pause, encode = float(job["sleep"]), Embedder.encode_images

        def slow(self, batch):
            time.sleep(pause)
            return encode(self, batch)

        Embedder.encode_images = slow
    if job.get("die"):
        hook, count = job["die"].split(":")
        _die_at(hook, int(count))

    if job["mode"] == "cli":
        from mmsearch.cli import main

        sys.argv = ["mmsearch", *job["argv"]]
        try:
            main()
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 0

    from mmsearch import Engine

    with Engine.open(job["index"], home=job["home"], model=job.get("model"),
                     pretrained=job.get("pretrained"),
                     batch_size=int(job.get("batch_size", 4))) as engine:
        report = engine.index([Path(f) for f in job["folders"]])
    out = {k: v for k, v in report.__dict__.items() if k != "skipped"}
    out["skipped"] = [[s.path, s.reason] for s in report.skipped]
    print(json.dumps(out), flush=True)
    return 0


def _child(job: dict) -> None:
    code = 70
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, key in ((1, "stdout"), (2, "stderr")):
            target = os.open(job.get(key, os.devnull), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
        code = run_job(job)
    except BaseException:  # noqa: BLE001 - everything ends here, the parent reads the code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    _imports()
    print("ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        sys.exit(run_job(json.loads(sys.argv[1])))
