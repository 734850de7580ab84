"""Storing an index: the SQLite catalog, the FAISS files, and the one writer that keeps them agreeing.

``catalog``      the SQLite schema, its versions and migrations, the queries (CatalogReader)
``vectors``      FAISS: the index plan (type, training, fallback), VectorIndex, search
``vectorfiles``  the FAISS files of a folder, checked and synced against the catalog
``lock``         the write lock
``integrity``    check and repair
``selection``    queries over the images' metadata (filters, records, summaries)
``shardvectors`` image vectors kept in npy shards (an index stored as ``shards``)
``sharded``      a FAISS index built in parts and merged
``store``        Store: an index folder; the only code that writes a catalog or a FAISS file
"""

from __future__ import annotations

from mmsearch.store.catalog import ImageFile, StoredImage
from mmsearch.store.lock import lock_holder
from mmsearch.store.selection import ImageSelection, MetadataSummary, camera_name
from mmsearch.store.shardvectors import STORAGES
from mmsearch.store.store import Store

__all__ = ["Store", "ImageFile", "StoredImage", "ImageSelection", "MetadataSummary",
           "camera_name", "lock_holder", "STORAGES"]
