"""core/imaging's resize without ROS: what the remote node does to every frame before
sending it (image_width x image_height), so the robot-floor lane runs it on Pillow 9.0.1."""

import base64
import binascii

import numpy as np
import pytest

from manipulation_policy.core.imaging import b64decode_in_pieces, resize_rgb


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


@pytest.mark.parametrize("size", [0, 1, 2, 3, 11, 12, 13, 24, 25, 100])
def test_base64_in_pieces_decodes_as_one_call(size):
    data = base64.b64encode(bytes(range(256)) * 2 + b"x" * size).decode()
    assert b64decode_in_pieces(data, piece_chars=8) == base64.b64decode(data, validate=True)


@pytest.mark.parametrize(
    "data", ["QUJD=QUJD", "QUJDRA==QUJDRA==", "QUJD\nREVG", "QUJDREV", "QUJD*REVG", "QUJDREVGé"]
)
def test_base64_in_pieces_refuses_what_one_call_refuses(data):
    with pytest.raises((binascii.Error, ValueError)):
        base64.b64decode(data, validate=True)
    with pytest.raises((binascii.Error, ValueError)):
        b64decode_in_pieces(data, piece_chars=4)
    with pytest.raises((binascii.Error, ValueError)):
        b64decode_in_pieces(data, piece_chars=8)
