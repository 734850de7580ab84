"""Evaluation: Recall@K of the engine itself on Karpathy-format benchmarks (``mmsearch eval``).

``datasets``  Karpathy split files (COCO, Flickr30K, Flickr8k), checked against the standard sizes
``metrics``   Recall@K, rsum, overlap of approximate with exact search (pure numpy)
``evaluate``  the images through the engine's ingest, the captions through its text path, then rank
"""
