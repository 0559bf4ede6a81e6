"""The observation a decision is asked for, from the chosen inputs: no ROS.

Two steps, as the node takes them: when a frame is handed over, the joint states,
the end-effector pose the scheduler let go with it and the node's parameters make
the observation (its image still undecoded; the state vector and who sends it, where
the node has them); when the frame (or each camera's of a set) is decoded, the
images and what the action timeline still plans are added. The policy nodes
(``nodes/node_execution``) and the replay (``manipulation_policy.replay``) both
build what they send this way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Optional

import numpy as np

from manipulation_policy.core.contract import MAX_PENDING_DELAY_SEC
from manipulation_policy.core.policy_types import JointStateData, Observation, Pose
from manipulation_policy.robot.executor import ChunkExecutor


def observation_without_image(
    joint_state: JointStateData,
    eef_pose: Optional[Pose],
    values: Mapping[str, Any],
    state: Optional[tuple[float, ...]] = None,
    robot_id: str = "",
) -> Observation:
    """The observation of a handed-over frame, before its image is decoded."""
    return Observation(
        joint_state=joint_state,
        image=None,
        reference_frame=values["reference_frame"],
        instruction=values["instruction"],
        eef_pose=eef_pose,
        state=state,
        robot_id=robot_id,
    )


def observation_to_send(
    observation: Observation,
    image: Optional[np.ndarray],
    executor: ChunkExecutor,
    images: Optional[Mapping[str, np.ndarray]] = None,
) -> Observation:
    """``observation`` with its decoded image (one camera) or images (several named
    cameras, ``image`` then None), and what the robot will still execute while it is
    answered, for a policy that conditions on it (real-time chunking)."""
    pending, delay = executor.pending(
        observation.reference_frame, len(observation.joint_state.name)
    )
    return replace(
        observation,
        image=image,
        images=dict(images or {}),
        pending_actions=pending,
        pending_delay_sec=None if delay is None else min(delay, MAX_PENDING_DELAY_SEC),
    )
