"""The policy node's inputs: the camera (raw or compressed), or several named cameras
(``camera_topics``, paired into sets by ``robot/camera_inputs``), joint states, the
end-effector pose, the aggregated ``manipulation_msgs/Observation`` (with
``use_observation``) and the task topic; and the choice, each time a frame may go,
between the aggregated observation and the raw topics
(``robot/observation_inputs.select_inputs``).

Subscriptions only store the newest message, under the node's ``_state_lock``; a
new frame asks the node to dispatch (``_dispatch_newest``). This mixin of
``PolicyNodeBase`` owns the ``_latest_*`` state and the topics it listens to.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any, Optional

from geometry_msgs.msg import PoseStamped
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String

from manipulation_msgs.msg import Observation as ObservationMsg
from manipulation_policy.core.policy_types import JointStateData
from manipulation_policy.nodes import ros_conversion
from manipulation_policy.robot.camera_inputs import (
    CameraSet,
    CameraSpec,
    camera_parameters_problem,
    camera_specs,
    pair_cameras,
)
from manipulation_policy.robot.node_shared import LOG_THROTTLE_SEC, Frame
from manipulation_policy.robot.observation_inputs import (
    AggregatedObservation,
    Inputs,
    ObservationSettings,
    Selection,
    Source,
    select_inputs,
)
from manipulation_policy.robot.scheduling import FrameInfo, StampedPose


class NodeInputs:
    """Subscriptions and input selection of ``PolicyNodeBase`` (a mixin)."""

    def _init_inputs(self) -> None:
        self._latest_frame: Optional[Frame] = None  # the (first) camera's
        self._cameras: tuple[CameraSpec, ...] = ()  # camera_topics; empty: camera_topic
        self._latest_camera_frames: dict[str, Frame] = {}
        self._latest_joint_state = JointStateData()
        self._latest_eef_pose: Optional[StampedPose] = None
        self._latest_aggregate: Optional[AggregatedObservation[Frame]] = None
        self._frame_sequence = 0  # frames of both sources, in arrival order
        self._input_source: Optional[Source] = None  # of the last decision (logged on change)
        self._observation_subscription = None
        self._reported_encodings: set[str] = set()

    def _subscribe_to_inputs(self, values: dict[str, Any]) -> None:
        problem = camera_parameters_problem(values)
        if problem is not None:
            raise ValueError(problem)
        self._cameras = camera_specs(
            values["camera_topics"], values["camera_names"], values["image_transport"]
        )
        if self._cameras:
            self._subscribe_to_cameras()
        else:
            camera_topic = values["camera_topic"]
            if values["image_transport"].strip().lower() == "compressed":
                camera_topic = camera_topic.rstrip("/") + "/compressed"
                self.create_subscription(
                    CompressedImage, camera_topic, self._on_compressed_image,
                    qos_profile_sensor_data,
                )
            else:
                self.create_subscription(
                    Image, camera_topic, self._on_image, qos_profile_sensor_data
                )
            self._camera_topic = camera_topic
        # Sensor-data QoS (best effort) matches reliable and best-effort publishers alike.
        self.create_subscription(
            JointState, values["joint_states_topic"], self._on_joint_state, qos_profile_sensor_data
        )
        self.create_subscription(
            PoseStamped, values["eef_pose_topic"], self._on_eef_pose,
            qos_profile_sensor_data,
        )
        self._observation_topic = values["observation_topic"]
        if values["use_observation"]:
            self._subscribe_to_observations()
        self._task_topic = values["instruction_topic"]
        self.create_subscription(String, values["instruction_topic"], self._on_instruction, 10)

    def _use_observation_changed(self, use: bool) -> None:
        if use:
            self._subscribe_to_observations()
        else:
            with self._state_lock:
                self._latest_aggregate = None

    def _new_frame(self, msg, stamp) -> Frame:
        """A received image as a frame; call with the state lock held."""
        self._frame_sequence += 1
        info = FrameInfo(self._frame_sequence, ros_conversion.stamp_to_nanoseconds(stamp))
        return Frame(msg, info, stamp)

    def _store_frame(self, msg) -> None:
        self._watchdog.camera_frame_received()
        with self._state_lock:
            self._counters["images"] += 1
            self._latest_frame = self._new_frame(msg, msg.header.stamp)
        if self._publishing:
            self._dispatch_newest()

    def _usable_image(self, msg: Image, topic: str) -> bool:
        """False (and an error logged once per encoding) for an encoding we cannot convert."""
        encoding = ros_conversion.unsupported_encoding(msg)
        if encoding is None:
            return True
        with self._state_lock:
            self._counters["unsupported_images"] += 1
            first_time = encoding not in self._reported_encodings
            self._reported_encodings.add(encoding)
        if first_time:
            self.get_logger().error(
                f"unsupported image encoding {encoding!r} on {topic}; such "
                "frames are skipped (supported: rgb8, bgr8, rgba8, bgra8, mono8)"
            )
        return False

    def _on_image(self, msg: Image) -> None:
        if self._usable_image(msg, self._camera_topic):
            self._store_frame(msg)

    def _on_compressed_image(self, msg: CompressedImage) -> None:
        self._store_frame(msg)

    def _subscribe_to_cameras(self) -> None:
        for camera in self._cameras:
            if camera.compressed:
                callback = partial(self._on_named_compressed_image, camera)
                kind = CompressedImage
            else:
                callback = partial(self._on_named_image, camera)
                kind = Image
            self.create_subscription(kind, camera.topic, callback, qos_profile_sensor_data)
        self._camera_topic = ", ".join(f"{c.topic} ({c.name})" for c in self._cameras)
        self._watchdog.watch_cameras(tuple(c.name for c in self._cameras))

    def _on_named_image(self, camera: CameraSpec, msg: Image) -> None:
        if self._usable_image(msg, camera.topic):
            self._store_named_frame(camera, msg)

    def _on_named_compressed_image(self, camera: CameraSpec, msg: CompressedImage) -> None:
        self._store_named_frame(camera, msg)

    def _store_named_frame(self, camera: CameraSpec, msg) -> None:
        """A frame of one of several cameras; the first camera's is the scheduler's frame
        (a new set), another's may complete a set waiting for it."""
        self._watchdog.camera_frame_received(camera.name)
        with self._state_lock:
            self._counters["images"] += 1
            frame = self._new_frame(msg, msg.header.stamp)
            self._latest_camera_frames[camera.name] = frame
            if camera is self._cameras[0]:
                self._latest_frame = frame
        if self._publishing:
            self._dispatch_newest()

    def _camera_set(self, first: Frame, values: dict[str, Any]) -> CameraSet[Frame]:
        """The frames of each camera to go with ``first`` (the first camera's), or why
        there is no set now; an empty set for a one-camera node."""
        if not self._cameras:
            return CameraSet({})
        with self._state_lock:
            newest = dict(self._latest_camera_frames)
        newest[self._cameras[0].name] = first
        return pair_cameras(
            [c.name for c in self._cameras], newest, lambda frame: frame.info.stamp_ns,
            float(values["camera_sync_tolerance_sec"]),
        )

    def _on_joint_state(self, msg: JointState) -> None:
        state = ros_conversion.joint_state_to_data(msg)
        self._watchdog.joint_state_received()
        with self._state_lock:
            self._counters["joint_states"] += 1
            self._latest_joint_state = state

    def _subscribe_to_observations(self) -> None:
        """Subscribe to observation_topic, once (use_observation on, at start or later).
        Sensor-data QoS matches upstream's reliable perception publisher too."""
        if self._observation_subscription is None:
            self._observation_subscription = self.create_subscription(
                ObservationMsg, self._observation_topic, self._on_observation,
                qos_profile_sensor_data,
            )

    def _on_observation(self, msg: ObservationMsg) -> None:
        if not self.parameter_values()["use_observation"]:
            return
        image_usable = msg.has_rgb_image and self._usable_image(
            msg.rgb_image, f"{self._observation_topic} (rgb_image)"
        )
        parts_without_frame = Inputs(
            joint_state=ros_conversion.observation_joint_state(msg),
            eef=ros_conversion.observation_eef_pose(msg),
        )
        stamp_ns = ros_conversion.stamp_to_nanoseconds(msg.header.stamp)
        if image_usable and not self._cameras:  # several cameras: theirs are watched
            self._watchdog.camera_frame_received()
        if parts_without_frame.joint_state.name:
            self._watchdog.joint_state_received()
        with self._state_lock:
            self._counters["observations"] += 1
            frame = (
                self._new_frame(msg.rgb_image, ros_conversion.observation_image_stamp(msg))
                if image_usable else None
            )
            self._latest_aggregate = AggregatedObservation(
                stamp_ns, Inputs(frame, parts_without_frame.joint_state, parts_without_frame.eef)
            )
        if self._publishing:
            self._dispatch_newest()

    def _on_eef_pose(self, msg) -> None:
        pose = ros_conversion.pose_stamped_to_pose(msg)
        stamp_ns = ros_conversion.stamp_to_nanoseconds(msg.header.stamp)
        with self._state_lock:
            self._latest_eef_pose = StampedPose(pose, stamp_ns, msg.header.frame_id)

    def _on_instruction(self, msg: String) -> None:
        if not msg.data.strip():
            # Upstream's "stop"/"clear": an empty task ends the current one.
            self._clear_task()
            return
        # Through the parameter, so `ros2 param get` shows it and validation applies;
        # accepting it starts a new task (_apply).
        result = self.set_parameters([Parameter("instruction", value=msg.data.strip())])[0]
        if not result.successful:
            self.get_logger().warning(f"instruction message refused: {result.reason}")

    def _select_inputs(self, values: dict[str, Any]) -> Selection:
        """The inputs of the next decision: the aggregated observation's or the raw
        topics' (a switch is logged)."""
        with self._state_lock:
            raw = Inputs(self._latest_frame, self._latest_joint_state, self._latest_eef_pose)
            aggregate = self._latest_aggregate
        if self._cameras and aggregate is not None:
            # Its one unnamed image is no camera of a set: the named topics' frames go.
            aggregate = replace(aggregate, inputs=replace(aggregate.inputs, frame=None))
        selection = select_inputs(
            aggregate, raw, self.get_clock().now().nanoseconds,
            ObservationSettings.from_values(values),
        )
        self._log_input_source(selection)
        return selection

    def _log_input_source(self, selection: Selection) -> None:
        """Say when the inputs switch between the aggregated observation and the raw topics
        (not the start on the raw topics: a robot without a perception node stays there)."""
        source, previous = selection.source, self._input_source
        self._input_source = source
        if source is previous or (previous is None and source is not Source.AGGREGATED
                                  and source is not Source.RAW_STALE):
            return
        if source is Source.AGGREGATED:
            self.get_logger().info(
                f"inputs: the aggregated observation on {self._observation_topic} (the raw "
                "topics fill in the parts it lacks)",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        elif source is Source.RAW_STALE:
            age = selection.observation_age_ns
            values = self.parameter_values()
            self.get_logger().warning(
                f"inputs: the raw topics; the aggregated observation on "
                f"{self._observation_topic} is "
                + ("stamped zero" if age is None else f"{age / 1e9:.3f} s old")
                + f" (observation_timeout_sec={values['observation_timeout_sec']:g}, "
                f"max_observation_age_sec={values['max_observation_age_sec']:g}). Check the "
                "perception node and that its clock matches this node's.",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        elif previous is not None:
            self.get_logger().info(f"inputs: {source.value}")

