"""Searching: what to look for (:mod:`.query`), how it is ranked (:mod:`.search`), what comes back (:mod:`.hits`)."""

from __future__ import annotations

from mmsearch.search.hits import ImageHit, TextHit, to_json
from mmsearch.search.filters import Filters
from mmsearch.search.query import Query, Term
from mmsearch.search.search import search_images, search_texts, top_images

__all__ = ["ImageHit", "TextHit", "to_json", "Query", "Term", "Filters", "search_images",
           "search_texts", "top_images"]
