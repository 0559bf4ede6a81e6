"""core/imaging's resize without ROS: what the remote node does to every frame before
sending it (image_width x image_height), so the robot-floor lane runs it on Pillow 9.0.1."""

import numpy as np

from manipulation_policy.core.imaging import resize_rgb


def test_resize_gives_the_asked_size_and_keeps_a_flat_colour():
    rgb = np.full((48, 64, 3), (200, 40, 90), dtype=np.uint8)
    resized = resize_rgb(rgb, 224, 224)
    assert resized.shape == (224, 224, 3) and resized.dtype == np.uint8
    assert (resized == (200, 40, 90)).all()


def test_resize_interpolates_between_neighbours():
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[:, 1] = 200
    row = resize_rgb(rgb, 8, 2)[0, :, 0]
    assert row[0] == 0 and row[-1] == 200
    assert (np.diff(row.astype(int)) >= 0).all() and 0 < row[3] < 200


def test_a_frame_already_at_size_is_sent_as_it_is():
    rgb = np.zeros((24, 32, 3), dtype=np.uint8)
    assert resize_rgb(rgb, 32, 24) is rgb
