"""Evaluation: Recall@K of the engine itself on Karpathy-format benchmarks (``mmsearch eval``).

``datasets``  Karpathy, Chinese-CLIP, XTD10 and MSR-VTT sets as RetrievalDataset; the standard sizes
``metrics``   Recall@K, rsum, overlap of approximate with exact search (pure numpy)
``evaluate``  the images through the engine's ingest, the captions through its text path, then rank
``video``     videos: each the span-weighted mean of its stored frames; exact ranks, median rank
"""

#: Whether ``mmsearch eval`` decodes JPEGs with Pillow's reduced-DCT draft (``--draft``) before
#: the resize: no. On photos at least twice the model's input size the draft's pixels are not
#: the ones open_clip's own preprocess sees (scores move, top-1s change), and published
#: figures are computed with full decoding. ``mmsearch index`` keeps the draft on (settings).
DRAFT = False
