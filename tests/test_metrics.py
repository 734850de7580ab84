"""Tests for mmsearch.metrics: Recall@K from ranked lists, tie rule, overlap recall."""

from __future__ import annotations

import numpy as np
import pytest

from mmsearch.eval import metrics
from mmsearch.errors import UsageError
from mmsearch.eval.metrics import (
    image_to_text_recall,
    mean_recall,
    overlap_recall,
    rank_by_similarity,
    recalls_from_similarity,
    rsum,
    text_to_image_recall,
)

# --------------------------------------------------------------------------- #
# (a) Hand-made toy case: 3 images x 5 captions
# --------------------------------------------------------------------------- #

# Rows are captions c0..c14, columns images 0, 1, 2.
# Captions c0-c4 describe image 0, c5-c9 image 1, c10-c14 image 2.
TOY_SIM = np.array(
    [
        # img0  img1  img2      text->image ranking (tie: lower index first), own image's rank
        [0.90, 0.10, 0.20],  # c0  -> 0,2,1   own 0: rank 1
        [0.80, 0.30, 0.30],  # c1  -> 0,1,2   own 0: rank 1 (tie 1/2 behind it)
        [0.20, 0.70, 0.40],  # c2  -> 1,2,0   own 0: rank 3
        [0.50, 0.50, 0.30],  # c3  -> 0,1,2   own 0: rank 1  TIE 0/1, lower index (own) wins
        [0.10, 0.20, 0.30],  # c4  -> 2,1,0   own 0: rank 3
        [0.60, 0.60, 0.20],  # c5  -> 0,1,2   own 1: rank 2  TIE 0/1, lower index (foreign) wins
        [0.10, 0.70, 0.20],  # c6  -> 1,2,0   own 1: rank 1
        [0.30, 0.40, 0.35],  # c7  -> 1,2,0   own 1: rank 1
        [0.20, 0.60, 0.60],  # c8  -> 1,2,0   own 1: rank 1  TIE 1/2, own is lower index
        [0.70, 0.20, 0.30],  # c9  -> 0,2,1   own 1: rank 3
        [0.00, 0.00, 0.10],  # c10 -> 2,0,1   own 2: rank 1
        [0.00, 0.05, 0.10],  # c11 -> 2,1,0   own 2: rank 1
        [0.15, 0.10, 0.05],  # c12 -> 0,1,2   own 2: rank 3
        [0.10, 0.10, 0.10],  # c13 -> 0,1,2   own 2: rank 3  three-way TIE, own has highest index
        [0.00, 0.00, 0.15],  # c14 -> 2,0,1   own 2: rank 1
    ]
)
TOY_CAPTION_IMAGE = np.repeat(np.arange(3), 5)

# Text -> image, by hand from the ranks above:
#   rank 1: c0 c1 c3 c6 c7 c8 c10 c11 c14 = 9/15  -> R@1 = 60%
#   rank<=2 adds c5                        = 10/15 -> R@2 = 66.67%
#   only 3 images exist: every query returns all of them (K_max = 3 < 5), so
#   the own image is always present        -> R@5 = R@10 = 100%
TOY_T2I_RANKING = np.array(
    [
        [0, 2, 1], [0, 1, 2], [1, 2, 0], [0, 1, 2], [2, 1, 0],
        [0, 1, 2], [1, 2, 0], [1, 2, 0], [1, 2, 0], [0, 2, 1],
        [2, 0, 1], [2, 1, 0], [0, 1, 2], [0, 1, 2], [2, 0, 1],
    ]
)

# Image -> text, reading the columns (hit if ANY of the image's 5 captions is in top k):
#   image 0: column max is c0 = 0.90 (its own caption)                  -> hit at 1
#   image 1: column max is 0.70, shared by c2 (image 0) and c6 (own);
#            tie -> lower index c2 first, so c6 is 2nd                  -> miss at 1, hit at 5
#   image 2: column sorted: c8 .60, c2 .40, c7 .35, c1 c3 c4 c9 .30,
#            c0 c5 c6 .20 (10 captions, none of them image 2's),
#            then c14 .15: its best own caption is 11th                 -> miss at 1, 5, 10
#   R@1 = 1/3 = 33.33%, R@5 = 2/3 = 66.67%, R@10 = 2/3 = 66.67%
TOY_I2T = {1: 100 / 3, 5: 200 / 3, 10: 200 / 3}
TOY_T2I = {1: 60.0, 5: 100.0, 10: 100.0}


def test_toy_ranking_follows_tie_rule() -> None:
    assert rank_by_similarity(TOY_SIM, 10).tolist() == TOY_T2I_RANKING.tolist()
    columns = rank_by_similarity(TOY_SIM.T, 12)
    assert columns[0, :3].tolist() == [0, 1, 9]  # .90, .80, .70
    assert columns[1, :2].tolist() == [2, 6]  # tie at .70: lower caption index first
    # image 2: c8, c2, c7, then the four .30 in index order, then the three .20
    assert columns[2, :11].tolist() == [8, 2, 7, 1, 3, 4, 9, 0, 5, 6, 14]


def test_toy_text_to_image() -> None:
    ranked = rank_by_similarity(TOY_SIM, 10)
    assert ranked.shape == (15, 3)  # fewer images than k: all of them, no padding
    recalls = text_to_image_recall(ranked, TOY_CAPTION_IMAGE, ks=(1, 2, 5, 10))
    assert recalls[1] == 60.0
    assert recalls[2] == pytest.approx(200 / 3, abs=1e-12)
    assert recalls[5] == 100.0
    assert recalls[10] == 100.0
    assert list(recalls) == [1, 2, 5, 10]


def test_toy_image_to_text_any_of_five_captions() -> None:
    ranked = rank_by_similarity(TOY_SIM.T, 10)
    recalls = image_to_text_recall(ranked, TOY_CAPTION_IMAGE)
    assert recalls == pytest.approx(TOY_I2T, abs=1e-12)


def test_toy_both_directions_and_rsum() -> None:
    t2i, i2t = recalls_from_similarity(TOY_SIM, TOY_CAPTION_IMAGE)
    assert t2i == TOY_T2I
    assert i2t == pytest.approx(TOY_I2T, abs=1e-12)
    # rsum = 60 + 100 + 100 + 33.33 + 66.67 + 66.67 = 426.67; mean = rsum / 6
    assert rsum(t2i, i2t) == pytest.approx(1280 / 3, abs=1e-9)
    assert mean_recall(t2i, i2t) == pytest.approx(1280 / 18, abs=1e-9)


def test_ties_are_decided_by_the_ranking_not_the_metric() -> None:
    """The metrics read only the ranked lists: flip a tie and the outcome flips."""
    ranked = TOY_T2I_RANKING.copy()
    # c5 (image 1) tied images 0 and 1; the rule put 0 first (miss). Put 1 first.
    ranked[5] = [1, 0, 2]
    # c3 (image 0) tied images 0 and 1; the rule put 0 first (hit). Put 1 first.
    ranked[3] = [1, 0, 2]
    recalls = text_to_image_recall(ranked, TOY_CAPTION_IMAGE, ks=(1,))
    assert recalls[1] == 60.0  # one hit gained (c5), one lost (c3): still 9/15
    ranked[3] = [0, 1, 2]
    assert text_to_image_recall(ranked, TOY_CAPTION_IMAGE, ks=(1,))[1] == pytest.approx(
        1000 / 15
    )

    columns = rank_by_similarity(TOY_SIM.T, 10)
    columns[1, :2] = [6, 2]  # image 1: own caption c6 first instead of c2
    assert image_to_text_recall(columns, TOY_CAPTION_IMAGE, ks=(1,))[1] == pytest.approx(
        200 / 3
    )


# --------------------------------------------------------------------------- #
# (b) Agreement with an obvious double-loop reference
# --------------------------------------------------------------------------- #


def _ref_rank(scores: list[float], target: int) -> int:
    """0-based rank of item ``target``: items scoring higher, or equal with a lower index."""
    s = scores[target]
    return sum(1 for j, v in enumerate(scores) if v > s or (v == s and j < target))


def _ref_t2i(sim: np.ndarray, owner: np.ndarray, ks: tuple[int, ...]) -> dict[int, float]:
    n_captions, n_images = sim.shape
    hits = {k: 0 for k in ks}
    for c in range(n_captions):
        row = [float(sim[c, i]) for i in range(n_images)]
        rank = _ref_rank(row, int(owner[c]))
        for k in ks:
            hits[k] += rank < k
    return {k: 100.0 * hits[k] / n_captions for k in ks}


def _ref_i2t(sim: np.ndarray, owner: np.ndarray, ks: tuple[int, ...]) -> dict[int, float]:
    n_captions, n_images = sim.shape
    hits = {k: 0 for k in ks}
    for i in range(n_images):
        column = [float(sim[c, i]) for c in range(n_captions)]
        best = min(_ref_rank(column, c) for c in range(n_captions) if owner[c] == i)
        for k in ks:
            hits[k] += best < k
    return {k: 100.0 * hits[k] / n_images for k in ks}


def _random_case(seed: int, quantized: bool) -> tuple[np.ndarray, np.ndarray]:
    """50 images x 250 captions; 5 per image, or (odd seeds) a ragged assignment."""
    rng = np.random.default_rng(seed)
    n_images, n_captions = 50, 250
    if seed % 2:
        owner = np.concatenate([np.arange(n_images), rng.integers(0, n_images, 200)])
        owner = rng.permutation(owner)
    else:
        owner = np.repeat(np.arange(n_images), 5)
    sim = rng.standard_normal((n_captions, n_images)).astype(np.float32)
    sim[np.arange(n_captions), owner] += 1.5  # make the task non-trivial
    if quantized:  # few distinct values: many exact ties
        sim = np.round(sim * 2) / 2
    return sim, owner


@pytest.mark.parametrize("quantized", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_matches_reference_loops(seed: int, quantized: bool) -> None:
    sim, owner = _random_case(seed, quantized)
    ks = (1, 5, 10, 50)
    t2i, i2t = recalls_from_similarity(sim, owner, ks=ks)
    assert t2i == _ref_t2i(sim, owner, ks)
    assert i2t == _ref_i2t(sim, owner, ks)


@pytest.mark.parametrize("seed", range(12))
def test_rank_by_similarity_equals_stable_argsort(seed: int, monkeypatch) -> None:
    rng = np.random.default_rng(seed)
    n_q, n_items = int(rng.integers(1, 40)), int(rng.integers(1, 60))
    sim = rng.integers(-3, 4, size=(n_q, n_items)).astype(np.float64)  # heavy ties
    if seed % 3 == 1:  # mostly distinct scores, a few exact duplicates per row
        sim = rng.standard_normal((n_q, n_items))
        sim[:, rng.integers(0, n_items, 5)] = sim[:, rng.integers(0, n_items, 5)]
    if seed % 3 == 0:
        sim[rng.random(sim.shape) < 0.1] = np.inf
        sim[rng.random(sim.shape) < 0.1] = -np.inf
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 7)  # force many small blocks
    for k in (1, 2, 5, n_items - 1, n_items, n_items + 3):
        if k < 1:
            continue
        expected = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        assert rank_by_similarity(sim, k).tolist() == expected.tolist()


def test_rank_by_similarity_dtypes() -> None:
    ints = np.array([[1, 3, 3, 2]], dtype=np.uint8)  # negation would wrap for uint8
    assert rank_by_similarity(ints, 3).tolist() == [[1, 2, 3]]
    assert rank_by_similarity(ints.astype(np.float32), 2).tolist() == [[1, 2]]
    assert rank_by_similarity(np.array([[0.0, -0.0, 1.0]]), 3).tolist() == [[2, 0, 1]]
    assert rank_by_similarity(np.zeros((0, 4)), 2).shape == (0, 2)


def test_rank_by_similarity_rejects_bad_input() -> None:
    with pytest.raises(UsageError, match="NaN"):
        rank_by_similarity(np.array([[0.1, np.nan]]), 1)
    with pytest.raises(UsageError, match="positive"):
        rank_by_similarity(np.ones((2, 2)), 0)
    with pytest.raises(UsageError, match="2-D"):
        rank_by_similarity(np.ones(3), 1)
    with pytest.raises(UsageError, match="numbers"):
        rank_by_similarity(np.array([["a", "b"]]), 1)


# --------------------------------------------------------------------------- #
# (c) -1 padding and K_max < k
# --------------------------------------------------------------------------- #


def test_padding_and_short_result_lists() -> None:
    owner = np.array([0, 1, 2, 3])
    ranked = np.array(
        [
            [0, -1],  # own image first: hit at every k
            [5, 1],  # own image second: miss at 1, hit at 2+
            [-1, -1],  # nothing returned: miss everywhere
            [7, -1],  # one wrong result, then nothing: miss everywhere
        ]
    )
    # K_max = 2 < 5, 10: what was not returned cannot be a hit.
    assert text_to_image_recall(ranked, owner, ks=(1, 2, 5, 10)) == {
        1: 25.0,
        2: 50.0,
        5: 50.0,
        10: 50.0,
    }
    empty = np.zeros((4, 0), dtype=np.int64)
    assert text_to_image_recall(empty, owner) == {1: 0.0, 5: 0.0, 10: 0.0}


def test_image_to_text_padding() -> None:
    owner = np.array([0, 0, 1, 1, 2])
    ranked = np.array(
        [
            [-1, 1, -1],  # caption 1 belongs to image 0: hit at 2
            [-1, -1, -1],  # nothing: miss
            [0, 4, -1],  # image 2: caption 0 is image 0's, caption 4 its own: hit at 2
        ]
    )
    assert image_to_text_recall(ranked, owner, ks=(1, 2, 10)) == pytest.approx(
        {1: 0.0, 2: 200 / 3, 10: 200 / 3}
    )


def test_recall_input_errors() -> None:
    owner = np.array([0, 1, 1])
    with pytest.raises(UsageError, match="rows"):
        text_to_image_recall(np.zeros((2, 3), dtype=np.int64), owner)
    with pytest.raises(UsageError, match="integer"):
        text_to_image_recall(np.zeros((3, 3)), owner)
    with pytest.raises(UsageError, match="below -1"):
        text_to_image_recall(np.full((3, 1), -2), owner)
    with pytest.raises(UsageError, match="positive"):
        text_to_image_recall(np.zeros((3, 1), dtype=np.int64), owner, ks=(0,))
    with pytest.raises(UsageError, match="caption id 3"):
        image_to_text_recall(np.array([[3], [0]]), owner)
    with pytest.raises(UsageError, match="own no caption"):
        image_to_text_recall(np.zeros((3, 1), dtype=np.int64), owner)
    with pytest.raises(UsageError, match="only 1 image"):
        image_to_text_recall(np.zeros((1, 1), dtype=np.int64), owner)
    with pytest.raises(UsageError, match="k=10"):
        rsum({1: 1.0, 5: 1.0}, {1: 1.0, 5: 1.0, 10: 1.0})


# --------------------------------------------------------------------------- #
# (d) overlap_recall
# --------------------------------------------------------------------------- #


def test_overlap_recall_simple() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert overlap_recall(exact, exact, k=4) == 1.0
    approx = np.array([[4, 3, 9, 1], [0, 0, 0, 5]])  # 3/4 found (order ignored), 1/4 found
    assert overlap_recall(approx, exact, k=4) == pytest.approx((0.75 + 0.25) / 2)
    # k=2: exact top-2 {1,2} vs approx {4,3} -> 0; {5,6} vs {0,0} -> 0
    assert overlap_recall(approx, exact, k=2) == 0.0
    # k larger than the arrays: uses what is there
    assert overlap_recall(approx, exact, k=100) == pytest.approx(0.5)


def test_overlap_recall_padding() -> None:
    exact = np.array([[3, 1, -1], [-1, -1, -1], [2, -1, -1]])  # small index; query 1 got nothing
    approx = np.array([[1, -1, -1], [4, -1, -1], [-1, -1, -1]])
    # query 0: {3,1} vs {1} -> 1/2; query 1 skipped (no exact ids); query 2: {2} vs {} -> 0
    assert overlap_recall(approx, exact, k=3) == pytest.approx(0.25)
    with pytest.raises(UsageError, match="no ids"):
        overlap_recall(approx[1:2], exact[1:2], k=3)
    with pytest.raises(UsageError, match="rows"):
        overlap_recall(approx[:2], exact, k=3)
