"""Where the remote node's API key comes from: a file or the environment, never a parameter."""

from __future__ import annotations

import os

import pytest

from manipulation_policy.core.api_key import (
    API_KEY_ENV,
    MAX_KEY_FILE_BYTES,
    ApiKeyUnusable,
    read_api_key,
)


def test_a_file_wins_over_the_environment(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("  from-file\n")
    assert read_api_key(str(key_file), {API_KEY_ENV: "from-env"}) == "from-file"
    assert read_api_key("", {API_KEY_ENV: " from-env "}) == "from-env"
    assert read_api_key("", {}) == ""


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "is empty"),
        (b"two words", "one printable ASCII token"),
        ("clé".encode(), "not ASCII"),
        (b"k" * (MAX_KEY_FILE_BYTES + 1), "over 4096 bytes"),
    ],
)
def test_an_unusable_key_file_is_refused_saying_why(tmp_path, content, says):
    key_file = tmp_path / "key"
    key_file.write_bytes(content)
    with pytest.raises(ApiKeyUnusable, match=says):
        read_api_key(str(key_file), {})


def test_only_a_regular_file_is_read(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would block until a writer came
    for path, says in ((fifo, "not a regular file"), (tmp_path, "not a regular file"),
                       (tmp_path / "missing", "cannot read")):
        with pytest.raises(ApiKeyUnusable, match=says):
            read_api_key(str(path), {})


def test_a_bad_key_in_the_environment_is_refused():
    with pytest.raises(ApiKeyUnusable, match=API_KEY_ENV):
        read_api_key("", {API_KEY_ENV: "a b"})
