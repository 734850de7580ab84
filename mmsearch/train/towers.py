"""Which parameters train, and weight-space ensembling (WiSE-FT) between two weight sets.

By default only the text tower trains and the image tower stays frozen (LiT): the
photos' vectors an index holds stay valid, and the image side costs nothing per step.
``text_layers=N`` trains only the last N text blocks (with the final norm and
projection; 0: the projection alone); ``unlock_image_layers=N`` also trains the last N image groups; ``full``
trains everything. BatchNorm statistics (ResNet towers) stay frozen: training runs in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

State = dict[str, "torch.Tensor"]
WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Unlocked:
    """What trains: text blocks (None: the whole text tower), image groups, or everything."""

    text_layers: int | None = None
    image_layers: int = 0
    full: bool = False
    learn_temperature: bool = True

    @property
    def image_trains(self) -> bool:
        return self.full or self.image_layers > 0

    def describe(self) -> str:
        if self.full:
            return "every layer"
        text = "the whole text tower" if self.text_layers is None else \
            f"the last {self.text_layers} text layers"
        image = f" and the last {self.image_layers} image layer groups" if self.image_layers else \
            " (image tower frozen)"
        return text + image


def set_trainable(model: Any, unlocked: Unlocked) -> list[str]:
    """Set ``requires_grad`` as ``unlocked`` says; returns the towers that will change."""
    for p in model.parameters():
        p.requires_grad_(True)
    if not unlocked.full:
        _lock_image_tower(model.visual, unlocked.image_layers)
        if unlocked.text_layers is not None:  # open_clip counts the projection as a group
            model.lock_text_tower(unlocked_layers=unlocked.text_layers + 1,
                                  freeze_layer_norm=True)  # (its assertion: norms lock too)
    if hasattr(model, "logit_scale"):
        model.logit_scale.requires_grad_(unlocked.learn_temperature)
    visual = any(p.requires_grad for p in model.visual.parameters())
    text = any(p.requires_grad for n, p in model.named_parameters()
               if not n.startswith("visual.") and n not in ("logit_scale", "logit_bias"))
    return [name for name, on in (("image", visual), ("text", text)) if on]


def _lock_image_tower(visual: Any, groups: int) -> None:
    """open_clip's lock (LiT), leaving the last ``groups`` layer groups trainable; for towers
    whose ``lock`` cannot (ResNets), the last ``groups`` sub-modules that have weights."""
    try:
        visual.lock(unlocked_groups=groups, freeze_bn_stats=False)
        return
    except AssertionError:  # "partial locking not currently supported for this model"
        pass
    visual.lock(unlocked_groups=0, freeze_bn_stats=False)
    weighted = [m for m in visual.children() if any(True for _ in m.parameters())]
    for module in weighted[len(weighted) - groups:]:
        for p in module.parameters():
            p.requires_grad_(True)


def snapshot(model: Any) -> State:
    """A CPU copy of every parameter and buffer (the state to come back to)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def wise(base: State, tuned: State, alpha: float) -> State:
    """WiSE-FT: ``(1 - alpha) * base + alpha * tuned`` for float tensors (others: ``tuned``)."""
    if alpha == 0:
        return base
    if alpha == 1:
        return tuned
    return {k: base[k] + alpha * (v - base[k]) if v.is_floating_point() else v
            for k, v in tuned.items()}
