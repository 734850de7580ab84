"""Indexing on a Ray cluster (``mmsearch index --runner ray``), in clip-retrieval's layout.

``plan``        the driver's plan: files to process, ids, manifest shards
``ray_runner``  the Ray Data pipeline: decode tasks, an embedding actor pool
``shards``      the shard files (npy + parquet, clip-retrieval's layout) and the run record
``run``         the whole run: plan, cluster, storing each shard, the index build
``build``       a FAISS index trained on the driver, filled in Ray tasks, merged

Ray and pyarrow are imported only when a run starts (``pip install 'mmsearch[ray]'``).
"""

from __future__ import annotations

from mmsearch.distributed.run import RayOptions, index_on_ray, options_from

__all__ = ["RayOptions", "index_on_ray", "options_from"]
