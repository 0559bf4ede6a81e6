"""What the safety guard checks each command of a chunk against, and the chunk as the
guard would let it out: no ROS.

Shared by the policy nodes (``nodes/node_publishing``) and the replay, so a replayed
command passes exactly the checks a published one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from manipulation_policy.core.policy_types import (
    ActionChunk,
    JointStateData,
    Observation,
    PolicyAction,
    Pose,
)
from manipulation_policy.robot.executor import DueCommand
from manipulation_policy.robot.message_reading import step_due_nanoseconds
from manipulation_policy.robot.safety_guard import GuardContext, SafetyGuard


@dataclass(frozen=True)
class ChunkOrigin:
    """What a command needs to know of the chunk it comes from."""

    stamp: Any  # builtin_interfaces/Time of the observation (the commands' header stamp)
    stamp_ns: int
    length: int
    period: float
    # Of the observation the chunk answers: what the guard checks its steps against.
    joint_state: JointStateData
    eef_pose: Optional[Pose]

    def guard_context(self, due_ns: int) -> GuardContext:
        return GuardContext(due_ns / 1e9, self.joint_state, self.eef_pose, self.stamp_ns / 1e9)

    @classmethod
    def of(cls, chunk: ActionChunk, stamp: Any, stamp_ns: int, observation: Observation
           ) -> ChunkOrigin:
        """The origin of ``chunk``, the answer to ``observation`` stamped ``stamp``."""
        return cls(stamp, stamp_ns, len(chunk), chunk.action_period_sec,
                   observation.joint_state, observation.eef_pose)

    def step_due_ns(self, step: int) -> int:
        return step_due_nanoseconds(self.stamp_ns, step, self.period)

    def step_and_due_ns(self, command: DueCommand) -> tuple[int, int]:
        """The PolicyOutput ``step_index`` and ``due`` of a due command of this chunk: an
        underrun hold is past the chunk's end (step_index == chunk_length), due when the
        timeline ran dry."""
        if command.is_underrun_hold:
            return self.length, round(command.due_sec * 1e9)
        return command.step_index, self.step_due_ns(command.step_index)


def guard_preview(guard: SafetyGuard, chunk: ActionChunk, origin: ChunkOrigin) -> ActionChunk:
    """``chunk``'s steps as a copy of ``guard`` lets them out at their due times (holds
    from a refused step on); ``guard`` itself is not touched."""
    preview = guard.copy()
    steps: list[PolicyAction] = []
    for index, action in enumerate(chunk.actions):
        result = preview.check(action, origin.guard_context(origin.step_due_ns(index)))
        steps.append(result.action)
        if result.refused:  # the plan ends there: the rest is never published
            steps += [PolicyAction.hold(chunk.reference_frame)] * (len(chunk) - index - 1)
            break
    return ActionChunk(tuple(steps), chunk.action_period_sec)
