"""Image-text and video-text retrieval datasets: read from their published layouts into one
flat type.

Every loader returns a :class:`RetrievalDataset` (image paths, captions, and
for each caption its image; a :class:`VideoRetrievalDataset` holds videos instead),
order preserved exactly, and turns every fault in the files into a one-line
:class:`~mmsearch.errors.DatasetError`.  Pure Python + numpy: nothing here imports
torch, open_clip or faiss.

``base``            RetrievalDataset, and what the readers share (lines, names, image checks)
``karpathy``        Karpathy's split JSON: COCO, Flickr30K, Flickr8k (``load_karpathy``)
``known``           the standard splits' published sizes, checked against a loaded set
``chinese``         Chinese-CLIP's ``{split}_texts.jsonl``: Flickr30K-CN, COCO-CN, MUGE
``chinese_images``  their images: a folder, or ``{split}_imgs.tsv`` decoded once into a cache
``xtd``             XTD10's line-aligned names and captions, one language at a time
``msrvtt``          videos: MSR-VTT's JSFusion CSV, or a CSV / JSON array of video_id, caption
``postags``         the warning for captions that still carry part-of-speech tags
``load``            ``load_dataset``: the loader chosen from what the path is
"""

from __future__ import annotations

from mmsearch.eval.datasets.base import RetrievalDataset
from mmsearch.eval.datasets.chinese import load_chinese_clip
from mmsearch.eval.datasets.karpathy import DEFAULT_MAX_CAPTIONS_PER_IMAGE, load_karpathy
from mmsearch.eval.datasets.known import KNOWN_DATASETS, KnownDataset, check_expected, resolve_known
from mmsearch.eval.datasets.load import load_dataset
from mmsearch.eval.datasets.msrvtt import VideoRetrievalDataset, load_msrvtt
from mmsearch.eval.datasets.postags import pos_tag_warning
from mmsearch.eval.datasets.xtd import load_xtd10

__all__ = [
    "DEFAULT_MAX_CAPTIONS_PER_IMAGE",
    "KNOWN_DATASETS",
    "KnownDataset",
    "RetrievalDataset",
    "VideoRetrievalDataset",
    "check_expected",
    "load_chinese_clip",
    "load_dataset",
    "load_karpathy",
    "load_msrvtt",
    "load_xtd10",
    "pos_tag_warning",
    "resolve_known",
]
