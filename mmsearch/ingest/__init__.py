"""Ingest: files on disk -> vectors in the store.

``discover``  walk folders, find image files, report what was skipped
``decode``    file -> RGB image, safely (bombs, truncation, modes, EXIF, draft decoding), content hash
``embed``     the local runner: decode in worker threads while the model runs on the previous batch
``diff``      the incremental diff both runners share: scan, compare with the catalog, count
``run``       a local index run: hash what changed, embed what is new, write through the store
``texts``     reading texts to index (.txt lines, .jsonl objects)

Importing this package imports nothing heavy; import the modules you need.
"""
