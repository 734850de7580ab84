"""Storing an index: the SQLite catalog, the FAISS files, and the one writer that keeps them agreeing.

``schema``       the catalog's tables, their versions and migrations, vectors as blobs
``sqlite``       the catalog's SQLite file: engine, typed connections, file checks
``catalog``      the catalog's queries (CatalogReader) and writes (Catalog)
``storage``      where image vectors are kept (catalog blobs or npy shards): VectorSource
``shardvectors`` image vectors kept in npy shards, read by location and written
``vectors``      FAISS: the index plan (type, training, fallback), VectorIndex, search
``vectorfiles``  the FAISS files of a folder, checked and synced against the catalog
``lock``         the write lock
``integrity``    check and repair
``selection``    queries over the images' metadata (filters, records, summaries)
``sharded``      a FAISS index built in parts and merged
``store``        Store: an index folder; the only code that writes a catalog or a FAISS file
"""

from __future__ import annotations

from mmsearch.store.catalog import ImageFile, StoredImage
from mmsearch.store.schema import VideoFile
from mmsearch.store.lock import lock_holder
from mmsearch.store.selection import ImageSelection, MetadataSummary, camera_name
from mmsearch.store.storage import (STORAGES, InShards, VectorSource, storage_for_run,
                                    storage_summary)
from mmsearch.store.store import RunIntent, Store

__all__ = ["Store", "RunIntent", "ImageFile", "StoredImage", "VideoFile", "ImageSelection", "MetadataSummary",
           "camera_name", "lock_holder", "STORAGES", "InShards", "VectorSource",
           "storage_for_run", "storage_summary"]
