"""What a backend hands over to export its Hugging Face text tower (:mod:`.onnxtext`).

A backend loads its model with torch and describes how its torch path embeds a text:
the module and the function from ``input_ids`` and ``attention_mask`` to the projected
vectors, the tokenizer and how it is used. Pure Python: nothing heavy is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch


class NotExportable(Exception):
    """The loaded text tower is not one :mod:`.onnxtext` can export (the message says why)."""


@dataclass
class HFText:
    """A loaded Hugging Face text tower as its torch path runs it."""

    module: Any  # the torch.nn.Module holding the weights ``forward`` uses
    forward: Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # ids, mask -> vectors
    tokenizer: Any  # transformers' tokenizer; its fast (``tokenizers``) form is what is saved
    max_length: int  # the longest token sequence the torch path keeps
    encode_texts: Callable[[list[str]], "np.ndarray"]  # the torch path, the export is held to
    clean: str = "none"  # open_clip's cleaning before tokenising: none, whitespace, lower
    mask_pad_id: int | None = None  # open_clip: the mask is ``ids != mask_pad_id``, else the
    # tokenizer's own


__all__ = ["HFText", "NotExportable"]
