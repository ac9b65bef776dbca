"""Overlays (x2sam_jax.eval.visualize), numpy only: the prompt is drawn where it was given, a mask
takes a colour that contrasts with what it covers, masks under the score threshold are not drawn
and the legend lists exactly the drawn ones, a GIF plays at the source's pace."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from x2sam_jax.eval import visualize
from x2sam_jax.eval.postprocess import SCORE_THRESHOLD

H, W = 40, 60
TITLE = 14            # visualize._TITLE_HEIGHT: panels start below their titles
GAP = 4               # side_by_side's gap between panels


def _grey() -> np.ndarray:
    return np.full((H, W, 3), 128, np.uint8)


def _panel(page: np.ndarray, index: int) -> np.ndarray:
    """Panel `index` of a page rendered at scale 1 (min_width=W): [H, W, 3]."""
    x = index * (W + GAP)
    return page[TITLE:TITLE + H, x:x + W]


def _render(image, masks, labels, scores=None, **kwargs):
    pred = np.asarray(masks, bool)[None]
    (page,) = visualize.render_pages([image], pred, labels, scores, min_width=W, **kwargs)
    return page


@pytest.mark.parametrize("prompt, inside, outside", [
    (visualize.Prompt("point", point=(12, 25)), [(25, 12)], [(5, 40), (25, 30)]),
    # a box's edges are drawn, its inside left alone
    (visualize.Prompt("box", box=(20, 10, 50, 30)), [(10, 35), (29, 35), (20, 20), (20, 49)], [(20, 35), (2, 2)]),
    # a mask's outline (its border pixels), not its inside
    (visualize.Prompt("mask", mask=np.pad(np.ones((10, 10), bool), ((15, 15), (25, 25)))),
     [(15, 30), (24, 30), (20, 25), (20, 34)], [(20, 30), (2, 2)]),
])
def test_the_prompt_is_drawn_on_the_input_panel_where_it_was_given(prompt, inside, outside):
    mask = np.zeros((H, W), bool)
    mask[5:9, 5:9] = True
    page = _render(_grey(), [mask], ["region"], [0.9], prompts=[prompt])
    source, prediction = _panel(page, 0), _panel(page, 1)
    drawn = {tuple(source[y, x]) for y, x in inside}
    assert len(drawn) == 1 and drawn != {(128, 128, 128)}, drawn      # one colour: the label's
    assert all(tuple(source[y, x]) == (128, 128, 128) for y, x in outside)
    # the prompt's colour is its mask's: the prediction panel outlines the mask in it
    assert tuple(prediction[5, 6]) == drawn.pop()
    # the prompt is not drawn on the prediction panel
    assert all(tuple(prediction[y, x]) == (128, 128, 128) for y, x in inside)


def test_an_enlarged_panel_draws_the_point_on_its_enlarged_pixel():
    frame = _grey()
    (page,) = visualize.render_pages([frame], np.zeros((1, 0, H, W), bool), [], [],
                                     prompts=[visualize.Prompt("point", point=(30, 10))])
    scale = -(-visualize.MIN_PANEL_WIDTH // W)                          # 4
    source = page[TITLE:TITLE + H * scale, :W * scale]
    assert source.shape == (H * scale, W * scale, 3)
    changed = np.argwhere((source != 128).any(-1))
    centre = changed.mean(0)
    np.testing.assert_allclose(centre, [(10 + 0.5) * scale - 0.5, (30 + 0.5) * scale - 0.5], atol=1.0)


def test_a_red_mask_is_not_drawn_on_a_red_object():
    image = _grey()
    obj = np.zeros((H, W), bool)
    obj[10:30, 15:45] = True
    image[obj] = (230, 20, 20)                                           # a red object
    (color,) = visualize.contrasting_colors(image[obj].mean(0, keepdims=True))
    red = np.array([230, 20, 20], np.float64)
    assert np.linalg.norm(color - red) > 250, color                     # red itself would be ~0
    # of the palette, the farthest from red: every other candidate is nearer
    candidates = visualize.palette(12).astype(np.float64)
    assert np.linalg.norm(color - red) == pytest.approx(np.linalg.norm(candidates - red, axis=1).max())
    page = _render(image, [obj], ["the red square"], [0.9])
    prediction = _panel(page, 1)
    blended = prediction[20, 30].astype(np.float64)                       # inside, away from the outline
    np.testing.assert_allclose(blended, np.rint(0.5 * red + 0.5 * color), atol=1)
    assert np.linalg.norm(blended - red) > 100
    # the outline: the mask's colour on its border, a black or white halo around it
    assert tuple(prediction[10, 30]) == tuple(color)
    assert tuple(prediction[9, 30]) in {(0, 0, 0), (255, 255, 255)}
    # two labels on one colour of object take two different colours
    two = visualize.contrasting_colors(np.repeat(red[None], 2, axis=0))
    assert not np.array_equal(two[0], two[1])


def test_masks_under_the_threshold_are_not_drawn_and_the_legend_lists_the_drawn_ones():
    image = _grey()
    masks = np.zeros((3, H, W), bool)
    masks[0, 2:10, 2:10] = masks[1, 15:25, 15:25] = masks[2, 30:38, 40:50] = True
    labels, scores = ["cat", "dog", "cup"], [0.91, 0.2, SCORE_THRESHOLD]
    shown, texts, note = visualize.legend(labels, scores)
    assert SCORE_THRESHOLD == 0.5 and shown == [0, 2] and texts == ["cat 0.91", "cup 0.50"]
    assert note == "under 0.50, not drawn: dog 0.20"
    many = visualize.legend(["a"] * 5, [0.1, 0.2, 0.3, 0.4, 0.9])[2]
    assert many == "under 0.50, not drawn: a 0.10, a 0.20, a 0.30 and 1 more"
    page = _render(image, masks, labels, scores)
    prediction = _panel(page, 1)
    assert (prediction[masks[1]] == 128).all()                           # "dog" (0.2): untouched
    assert (prediction[masks[0]] != 128).any(-1).all() and (prediction[masks[2]] != 128).any(-1).all()
    # the legend: one row per drawn mask and the note, below the panel
    assert page.shape[0] == TITLE + H + 2 + 3 * 13
    assert visualize.legend(labels, None)[0] == [0, 1, 2]                # no scores: all drawn
    assert visualize.legend(labels, scores, threshold=0.1)[2] is None
    with_low = _render(image, masks, labels, scores, threshold=0.1)
    assert (_panel(with_low, 1)[masks[1]] != 128).any(-1).all()


def test_ground_truth_panel_keeps_the_label_colours():
    image = _grey()
    mask = np.zeros((H, W), bool)
    mask[5:15, 5:15] = True
    page = _render(image, [mask], ["cat"], [0.8], gt=mask[None, None], gt_labels=["cat"])
    assert page.shape[1] == 3 * W + 2 * GAP
    np.testing.assert_array_equal(_panel(page, 1)[5:15, 5:15], _panel(page, 2)[5:15, 5:15])


def test_gif_frames_last_as_long_as_the_source_frames_apart(tmp_path):
    assert visualize.frame_duration_ms(None) == visualize.DEFAULT_FRAME_MS
    assert visualize.frame_duration_ms([0.0, 0.04, 0.08]) == 40          # 25 fps
    assert visualize.frame_duration_ms([0.0, 1.0, 2.0, 3.0]) == 1000      # every 30th frame of 30 fps
    assert visualize.frame_duration_ms([0.0, 0.001]) == 20                # browsers' floor
    frames = [np.full((8, 8, 3), v, np.uint8) for v in (0, 255)]
    path = visualize.save_pages(tmp_path / "clip", frames, duration_ms=visualize.frame_duration_ms([0.0, 0.1]))
    with Image.open(path) as gif:
        assert path.endswith(".gif") and gif.n_frames == 2 and gif.info["duration"] == 100
