"""Captions that still carry part-of-speech tags: a warning, never an error.

Some Flickr30K-CN annotation files carry segmenter output with the tags left
in (``一个/m 男人/n 在/p 骑/v 自行车/n``); text encoders then score far below
the published numbers.  :func:`pos_tag_warning` looks at a loaded
:class:`RetrievalDataset`'s captions and returns one line for the caller to
show when more than a few look tagged.  Nothing is printed here.
"""

from __future__ import annotations

import re

from mmsearch.eval.datasets.base import RetrievalDataset

#: A token with a part-of-speech tag left on it: ``男人/n``, ``骑:v``, ``，/wp``.
_POS_TAG = re.compile(r"[^\s/:]+[/:][a-z]{1,3}(?![A-Za-z])")

#: Share of tagged captions above which :func:`pos_tag_warning` warns.
_POS_TAGGED_SHARE = 0.05


def _pos_tags(caption: str) -> list[str]:
    """The tagged tokens of ``caption`` if it looks tagged (at least two, and at
    least half of its whitespace tokens), else ``[]``."""
    tags = _POS_TAG.findall(caption)
    if len(tags) >= 2 and 2 * len(tags) >= len(caption.split()):
        return tags
    return []


def pos_tag_warning(ds: RetrievalDataset) -> str | None:
    """A one-line warning if more than 5% of ``ds``'s captions look POS-tagged, else ``None``.

    Some Flickr30K-CN annotation files carry segmenter output with the tags
    left in (``一个/m 男人/n 在/p 骑/v 自行车/n``, or ``男人:n``; see
    CLIP_benchmark PR #101); text encoders then score far below the published
    numbers.  A caption counts as tagged when at least two of its tokens, and
    at least half of its whitespace-separated tokens, end in ``/x`` or ``:x``
    (``x`` one to three lowercase letters), so ``km/h`` or a URL in an English
    caption does not trigger it.  Nothing is printed; the caller decides.
    """
    tagged = 0
    example = ""
    for caption in ds.captions:
        tags = _pos_tags(caption)
        if tags:
            tagged += 1
            example = example or tags[0]
    if tagged == 0 or tagged <= _POS_TAGGED_SHARE * ds.n_captions:
        return None
    return (
        f"{tagged} of {ds.n_captions} captions look part-of-speech tagged ({example!r}); "
        f"strip the tags first (see CLIP_benchmark PR #101)"
    )
