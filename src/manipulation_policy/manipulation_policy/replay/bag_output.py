"""The replay's MCAP bag: the PolicyOutput and PolicyActionChunk messages the node would
have published, on its output and chunk topics, at the simulated times it would have
published them (so ``ros2 bag play`` plays them in the node's rhythm), and one
std_msgs/String per request on ``REQUESTS_TOPIC`` (JSON: request id, observation stamp,
latency, failure) for a later comparison and for Foxglove.

Written into a hidden folder beside the destination and moved into place only when
complete: an interrupted or failed replay leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys.store import Typestore

from manipulation_policy.replay.bag_types import (
    POLICY_ACTION_CHUNK,
    POLICY_OUTPUT,
    build_message,
)
from manipulation_policy.replay.errors import ReplayInputError
from manipulation_policy.replay.simulated_node import ChunkMessage, Command, Request

REQUESTS_TOPIC = "/manipulation/replay/requests"
STRING = "std_msgs/msg/String"
ROSBAG2_VERSION = 8  # what ros2 bag of Humble reads


def request_json(request: Request) -> str:
    return json.dumps({
        "request_id": request.request_id,
        "stamp_ns": request.stamp_ns,
        "latency_ms": round(request.latency_ms, 3),
        "failure": request.failure,
    })


def check_destination(path: Path) -> None:
    """The bag can be written at ``path`` (checked before a model is loaded)."""
    if path.exists():
        raise ReplayInputError(f"{path} exists already: choose another --output")
    if not path.parent.is_dir():
        raise ReplayInputError(f"{path.parent}: no such folder for --output")


class OutputBag:
    """A context manager: ``write`` each output; the bag appears at ``path`` on a clean exit."""

    def __init__(self, path: str, store: Typestore, output_topic: str, chunk_topic: str):
        self.path = Path(path)
        check_destination(self.path)
        self._store = store
        self._topics = (output_topic, chunk_topic)
        self._staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self._writer = Writer(
            self._staging / self.path.name, version=ROSBAG2_VERSION,
            storage_plugin=StoragePlugin.MCAP,
        )

    def __enter__(self) -> OutputBag:
        try:
            self._writer.open()
            output_topic, chunk_topic = self._topics
            self._connections = {
                Command: (self._writer.add_connection(output_topic, POLICY_OUTPUT,
                                                      typestore=self._store), POLICY_OUTPUT),
                ChunkMessage: (self._writer.add_connection(chunk_topic, POLICY_ACTION_CHUNK,
                                                           typestore=self._store),
                               POLICY_ACTION_CHUNK),
                Request: (self._writer.add_connection(REQUESTS_TOPIC, STRING,
                                                      typestore=self._store), STRING),
            }
        except BaseException:
            self._discard()
            raise
        return self

    def write(self, item: Any) -> None:
        connection, msgtype = self._connections[type(item)]
        fields = {"data": request_json(item)} if isinstance(item, Request) else item.fields
        message = build_message(self._store, msgtype, fields)
        self._writer.write(connection, item.time_ns, self._store.serialize_cdr(message, msgtype))

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._writer.close()
            os.replace(self._staging / self.path.name, self.path)
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)

    def _discard(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - it is being thrown away
            pass
        shutil.rmtree(self._staging, ignore_errors=True)
