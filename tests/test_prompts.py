"""Visual prompt synthesis: properties checked over many random instances."""

import numpy as np
import pytest
from scipy import ndimage

from x2sam_jax.data import prompts as vp

CFG = vp.PromptConfig()


def _random_instance(rng):
    """A mask of 1-3 ellipses / rectangles (possibly disjoint) on a random canvas."""
    h, w = (int(v) for v in rng.integers(60, 220, 2))
    mask = np.zeros((h, w), bool)
    rows, cols = np.ogrid[:h, :w]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(3, h / 3), rng.uniform(3, w / 3)
        if rng.random() < 0.5:
            mask |= ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
        else:
            mask[int(max(0, cy - ry)) : int(cy + ry), int(max(0, cx - rx)) : int(cx + rx)] = True
    return mask


def _instances(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        m = _random_instance(rng)
        if m.sum() > 5:
            out.append(m)
    return out


INSTANCES = _instances(120)


def test_connected_regions_match_scipy_and_skip_specks():
    mask = np.zeros((50, 50), bool)
    mask[5:20, 5:25] = True  # 300 px
    mask[30, 30] = mask[31, 31] = True  # a 2-px diagonal speck: 8-connected, area 2 <= 5
    mask[40:43, 40:43] = True  # 9 px
    regions = vp.connected_regions(mask, min_area=5)
    assert [r.area for r in regions] == [300, 9]
    assert regions[0].bbox == (5, 5, 20, 25)
    assert regions[0].centroid == pytest.approx((12.0, 14.5))
    for m in INSTANCES[:30]:
        labels, count = ndimage.label(m, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel())[1:]
        assert len(vp.connected_regions(m)) == int((sizes > 5).sum())


def test_point_prompts_inside_mask_near_centroid_and_disk_shaped():
    rng = np.random.default_rng(1)
    for mask in INSTANCES:
        regions = vp.connected_regions(mask)
        seeds = vp.point_seeds(mask, regions, rng, CFG)
        assert len(seeds) == len(regions)  # blobs and boxes always admit a point
        for (row, col), region in zip(seeds, regions):
            assert mask[row, col]
            r0, c0, r1, c1 = region.bbox
            assert r0 <= row < r1 and c0 <= col < c1
            radius = 0.5 * min(r1 - r0, c1 - c0)
            # offset length <= radius, then int truncation moves each axis by < 1 pixel
            assert np.hypot(row - region.centroid[0], col - region.centroid[1]) <= radius + np.sqrt(2)
        prompt = vp.point_prompt(mask, regions, np.random.default_rng(7), CFG)
        seeds = vp.point_seeds(mask, regions, np.random.default_rng(7), CFG)
        rows, cols = np.ogrid[: mask.shape[0], : mask.shape[1]]
        expected = np.zeros_like(mask)
        for row, col in seeds:
            expected |= (rows - row) ** 2 + (cols - col) ** 2 <= CFG.point_radius**2
        np.testing.assert_array_equal(prompt, expected)


def test_box_prompts_are_jittered_bboxes():
    rng = np.random.default_rng(2)
    for mask in INSTANCES:
        regions = vp.connected_regions(mask)
        if len(regions) != 1:
            continue
        (region,) = regions
        prompt = vp.box_prompt(mask, regions, rng, CFG)
        r0, c0, r1, c1 = region.bbox
        rows, cols = np.nonzero(prompt)
        pr0, pr1, pc0, pc1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert prompt.sum() == (pr1 - pr0) * (pc1 - pc0)  # filled rectangle
        h, w = r1 - r0, c1 - c0
        for lo, hi, size, limit, (p_lo, p_hi) in [(r0, r1, h, mask.shape[0], (pr0, pr1)), (c0, c1, w, mask.shape[1], (pc0, pc1))]:
            # each side moves by at most 5% of the size (+1 for int truncation), clipped to the image
            assert abs(p_lo - max(0, lo)) <= 0.05 * size + 1
            assert abs(p_hi - min(limit, hi)) <= 0.05 * size + 1
        centre_r, centre_c = (pr0 + pr1) / 2, (pc0 + pc1) / 2
        if pr0 > 0 and pr1 < mask.shape[0]:
            assert abs(centre_r - (r0 + r1) / 2) <= 1


def test_scribble_boxes_keep_iou_and_scale_bounds():
    rng = np.random.default_rng(3)
    checked = 0
    for mask in INSTANCES:
        for region in vp.connected_regions(mask):
            box = vp.scribble_box(mask.shape, region, rng, CFG)
            assert box is not None
            assert vp.box_iou_inclusive(box, region.bbox) >= 0.5
            r0, c0, r1, c1 = region.bbox
            assert box[2] - box[0] <= 1.2 * (r1 - r0) + 1 and box[3] - box[1] <= 1.2 * (c1 - c0) + 1
            checked += 1
    assert checked >= 120


def test_scribble_prompts_follow_a_wiggled_diagonal():
    for k, mask in enumerate(INSTANCES):
        regions = vp.connected_regions(mask)
        prompt = vp.scribble_prompt(mask, regions, np.random.default_rng(k), CFG)
        assert prompt.any()
        # every scribble pixel lies within (amplitude <= 20 + radius 5) rows and radius 5 columns
        # of some jittered box; replay the draws to get the boxes
        replay = np.random.default_rng(k)
        allowed = np.zeros_like(mask)
        for region in regions:
            box = vp.scribble_box(mask.shape, region, replay, CFG)
            replay.integers(4), replay.uniform(), replay.uniform(), replay.uniform()  # corner, amp, freq, phase
            b0, b1, b2, b3 = box
            allowed[max(0, b0 - 25) : b2 + 26, max(0, b1 - 5) : b3 + 6] = True
        assert not (prompt & ~allowed).any()
        # thickness: the scribble is a dilation by radius 5, so it holds a full disk somewhere
        assert ndimage.distance_transform_edt(prompt).max() >= CFG.scribble_radius


def test_mask_prompts_are_a_smoothed_mask():
    for mask in INSTANCES:
        prompt = vp.mask_prompt(mask, CFG)
        assert prompt.any()
        # The threshold is the mean over the whole image (the official rule): masks that fill
        # much of the image shrink, while small ones are kept almost whole (and grow a little).
        if mask.sum() <= 0.25 * mask.size:
            assert (prompt & mask).sum() >= 0.85 * mask.sum()
        # only pixels within a few sigma of the mask can be switched on
        assert not (prompt & (ndimage.distance_transform_edt(~mask) > 3 * CFG.mask_sigma)).any()


def test_synthesis_is_deterministic_per_seed_and_kind_checked():
    mask = INSTANCES[0]
    for kind in vp.PROMPT_KINDS:
        a = vp.synthesize(mask, kind, np.random.default_rng(5))
        b = vp.synthesize(mask, kind, np.random.default_rng(5))
        np.testing.assert_array_equal(a, b)
    kinds = {vp.random_prompt(mask, np.random.default_rng(s))[0] for s in range(40)}
    assert kinds == set(vp.PROMPT_KINDS)
    with pytest.raises(ValueError, match="unknown visual prompt kind"):
        vp.synthesize(mask, "lasso", np.random.default_rng(0))
    speck = np.zeros((30, 30), bool)
    speck[3, 3] = True  # area 1: no component qualifies -> point/scribble/box empty
    assert not vp.synthesize(speck, "point", np.random.default_rng(0)).any()
    assert not vp.synthesize(speck, "box", np.random.default_rng(0)).any()
