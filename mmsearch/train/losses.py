"""The training objectives, on L2-normalised features (torch tensors, rows paired by index).

* :func:`info_nce` -- CLIP's symmetric InfoNCE with temperature tau = 1 / logit_scale
  (open_clip's own ``ClipLoss``): for a batch of N pairs,
  ``L = 1/2 [CE(s * I T^T, diag) + CE(s * T I^T, diag)]``.
* :func:`triplet` -- the hinge loss with the hardest negative in the batch, both
  directions (VSE++): ``max_j [m - <i, t> + <i, t_j>]_+ + max_j [m - <i, t> + <i_j, t>]_+``.
* :func:`feature_distill` -- ``1 - cos(student, teacher)``, averaged.
* :func:`affinity_distill` -- soft targets: KL between the teacher's and the student's
  image->text distributions over a batch of captions, at the teacher's temperature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

LOSSES = ("infonce", "triplet")
DEFAULT_MARGIN = 0.2


def info_nce(image: "torch.Tensor", text: "torch.Tensor", logit_scale: "torch.Tensor") -> "torch.Tensor":
    """Symmetric InfoNCE (CLIP) over a batch; ``logit_scale`` is 1 / temperature."""
    from open_clip.loss import ClipLoss

    return ClipLoss()(image, text, logit_scale)


def triplet(image: "torch.Tensor", text: "torch.Tensor", margin: float = DEFAULT_MARGIN) -> "torch.Tensor":
    """Hinge loss with the hardest in-batch negative, image->text plus text->image."""
    import torch

    scores = image @ text.T
    positive = scores.diagonal()
    mask = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    wrong_text = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(mask, 0)
    wrong_image = (margin + scores - positive[None, :]).clamp(min=0).masked_fill(mask, 0)
    return wrong_text.max(dim=1).values.mean() + wrong_image.max(dim=0).values.mean()


def feature_distill(student: "torch.Tensor", teacher: "torch.Tensor") -> "torch.Tensor":
    """Mean cosine distance between the student's and the teacher's vectors."""
    return (1 - (student * teacher).sum(dim=-1)).mean()


def affinity_distill(student: "torch.Tensor", teacher: "torch.Tensor", text: "torch.Tensor",
                     logit_scale: float) -> "torch.Tensor":
    """KL(teacher || student) of the image->text softmax over the batch's captions."""
    import torch.nn.functional as F

    target = F.log_softmax(logit_scale * teacher @ text.T, dim=-1)
    guess = F.log_softmax(logit_scale * student @ text.T, dim=-1)
    return F.kl_div(guess, target, reduction="batchmean", log_target=True)
