"""The safety guard, no ROS: whatever a backend answers, nothing published breaks a limit.

Property tests (hypothesis) run random actions, wild ones included (NaN, inf,
1e308, non-unit quaternions), through guards with random limits, one action at a
time and as sequences, and check every value that would be published against
every limit; example tests pin each clamp and refusal and the defaults against
what the stub and the chunked test backend answer.
"""

from __future__ import annotations

import math
import threading
from dataclasses import fields, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_test_backends import CHUNK_PERIOD_SEC, RECKLESS_LIMITS, chunk_steps, reckless_chunk

from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.policy_types import (
    EefTargetMode,
    JointStateData,
    Observation,
    PolicyAction,
    Pose,
    Quaternion,
    Twist,
    Vector3,
)
from manipulation_policy.core.pose_math import quaternion_from_rpy, quaternion_multiply
from manipulation_policy.robot.node_parameters import (
    GUARD_PARAMETERS,
    changes_problem,
    specs_by_name,
)
from manipulation_policy.robot.safety_guard import (
    CLAMP_NAMES,
    REFUSAL_CODES,
    GuardContext,
    GuardLimits,
    SafetyGuard,
    rotation_angle,
    vector_length,
)

EPS = 1e-9
JOINTS = JointStateData(("shoulder", "elbow", "wrist"), (0.3, -0.2, 0.9))
CURRENT = Pose(Vector3(0.35, 0.05, 0.25), quaternion_from_rpy(0.0, 0.0, math.pi / 2))


def ctx(now: float = 0.0, joints: JointStateData = JOINTS, eef=None) -> GuardContext:
    return GuardContext(now, joints, eef)


def conjugate(q: Quaternion) -> Quaternion:
    return Quaternion(-q.x, -q.y, -q.z, q.w)


def relative_angle(a: Quaternion, b: Quaternion) -> float:
    return rotation_angle(quaternion_multiply(b, conjugate(a)))


def distance(a: Vector3, b: Vector3) -> float:
    return vector_length((a.x - b.x, a.y - b.y, a.z - b.z))


# ---------------------------------------------------------------- strategies

wild = st.one_of(
    st.floats(-2.0, 2.0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, -1.0, 1e308, -1e308, 5e-324]),
)
unit_quaternion = st.builds(
    quaternion_from_rpy, st.floats(-math.pi, math.pi), st.floats(-math.pi, math.pi),
    st.floats(-math.pi, math.pi),
)
quaternion = st.one_of(unit_quaternion, unit_quaternion,
                       st.builds(Quaternion, wild, wild, wild, wild))
vector = st.builds(Vector3, wild, wild, wild)
pose = st.builds(Pose, vector, quaternion)
unit_interval_ish = st.one_of(st.floats(0.0, 1.0), wild)


# None: the joint state's order; the same joints in another order; one the robot has not;
# one named twice; too few names for three values.
JOINT_NAMINGS = [None, ("wrist", "shoulder", "elbow"), ("elbow", "gripper", "shoulder"),
                 ("elbow", "elbow", "wrist"), ("wrist", "elbow")]
joint_targets = st.one_of(st.floats(-3.0, 3.0), wild)


@st.composite
def actions(draw, joint_count: int = 3) -> PolicyAction:
    return PolicyAction(
        eef_target=draw(st.none() | pose),
        eef_target_mode=draw(st.sampled_from(EefTargetMode)),
        joint_deltas=draw(st.none() | st.tuples(*[wild] * joint_count)),
        gripper_command=draw(st.none() | unit_interval_ish),
        base_velocity_hint=draw(st.none() | st.builds(Twist, vector, vector)),
        confidence=draw(unit_interval_ish),
        joint_positions=draw(st.none() | st.tuples(*[joint_targets] * joint_count)),
        joint_names=draw(st.sampled_from(JOINT_NAMINGS)),
    )


positive = st.floats(1e-3, 3.0)


@st.composite
def limits(draw) -> GuardLimits:
    low = draw(st.tuples(*[st.floats(-2.0, 0.5)] * 3))
    size = draw(st.tuples(*[st.floats(0.05, 3.0)] * 3))
    named = draw(st.sampled_from([(), ("elbow",), ("shoulder", "wrist")]))
    lows = tuple(draw(st.floats(-1.5, 0.5)) for _ in named)
    with_positions = draw(st.booleans())
    return GuardLimits(
        workspace_min=low,
        workspace_max=tuple(a + b for a, b in zip(low, size, strict=True)),
        max_eef_step_m=draw(positive),
        max_eef_step_rad=draw(st.floats(1e-3, math.pi)),
        max_joint_delta=draw(positive),
        joint_limit_names=named,
        joint_max_deltas=tuple(draw(positive) for _ in named) if draw(st.booleans()) else (),
        joint_position_min=lows if with_positions else (),
        joint_position_max=tuple(v + draw(st.floats(0.0, 2.0)) for v in lows)
        if with_positions else (),
        max_gripper_rate=draw(st.sampled_from([0.0, 0.5, 2.0, 10.0])),
        max_base_linear_speed=draw(positive),
        max_base_angular_speed=draw(positive),
        min_confidence=draw(st.floats(0.0, 1.0)),
    )


joint_states = st.builds(
    JointStateData,
    st.just(JOINTS.name),
    st.tuples(*[st.one_of(st.floats(-3.0, 3.0), st.just(math.nan))] * 3),
)
contexts = st.builds(GuardContext, st.floats(0.0, 100.0), joint_states, st.none() | pose,
                     st.none() | st.floats(0.0, 100.0))


# ---------------------------------------------------------------- the invariant


class Published:
    """What the guard let out so far, to check the step limits against (the test's own
    account, kept apart from the guard's)."""

    def __init__(self) -> None:
        self.target = None  # (pose, due time)
        self.gripper = None  # (command, due time)
        self.joints = {}  # joint name -> (absolute target, due time)

    def reset(self) -> None:
        self.target = self.gripper = None
        self.joints = {}


def joint_of(action: PolicyAction, state: JointStateData, index: int) -> tuple[str, float]:
    """(the joint a joint value is for, its position in the joint state or NaN)."""
    if action.joint_names:
        name = action.joint_names[index]
    else:
        name = state.name[index] if index < len(state.name) else f"#{index}"
    if name not in state.name:
        return name, math.nan
    return name, state.position[state.name.index(name)]


def assert_joint_step_within(limits: GuardLimits, name: str, start: float, step: float) -> None:
    """A step of joint ``name`` from ``start`` within its cap and its position range."""
    assert math.isfinite(step)
    k = limits.joint_limit_names.index(name) if name in limits.joint_limit_names else None
    cap = limits.joint_max_deltas[k] if k is not None and limits.joint_max_deltas \
        else limits.max_joint_delta
    assert abs(step) <= cap + EPS
    if k is not None and limits.joint_position_min:
        low, high = limits.joint_position_min[k], limits.joint_position_max[k]
        if not math.isfinite(start):
            assert step == 0.0
        elif low <= start <= high:
            assert low - EPS <= start + step <= high + EPS
        else:  # outside: only back towards the range
            gap = max(low - start, start - high)
            assert max(low - start - step, start + step - high) <= gap + EPS


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def assert_within_limits(limits: GuardLimits, action: PolicyAction, context: GuardContext,
                         published: Published) -> None:
    """Every value of a published (not refused) action within every limit."""
    assert limits.min_confidence <= action.confidence <= 1.0
    if action.gripper_command is not None:
        g = action.gripper_command
        assert 0.0 <= g <= 1.0
        if published.gripper is not None and limits.max_gripper_rate > 0:
            last, at = published.gripper
            allowed = limits.max_gripper_rate * max(0.0, context.now_sec - at)
            assert abs(g - last) <= allowed + EPS
        published.gripper = (g, context.now_sec)
    state = context.joint_state
    if action.joint_names:
        assert len(set(action.joint_names)) == len(action.joint_names)
    for kind in (action.joint_deltas, action.joint_positions):
        if kind is not None and action.joint_names:
            assert len(kind) == len(action.joint_names)
    for index, delta in enumerate(action.joint_deltas or ()):
        name, position = joint_of(action, state, index)
        assert_joint_step_within(limits, name, position, delta)
    for index, target in enumerate(action.joint_positions or ()):
        name, position = joint_of(action, state, index)
        last = published.joints.get(name)
        if last is None or (math.isfinite(position) and context.observation_sec is not None
                            and context.observation_sec > last[1]):
            start = position
        else:
            start = last[0]
        assert math.isfinite(start)  # else refused: no step could be limited
        assert math.isfinite(target)
        assert_joint_step_within(limits, name, start, target - start)
    for index, target in enumerate(action.joint_positions or ()):
        published.joints[joint_of(action, state, index)[0]] = (target, context.now_sec)
    if action.base_velocity_hint is not None:
        hint = action.base_velocity_hint
        for part, cap in (("linear", limits.max_base_linear_speed),
                          ("angular", limits.max_base_angular_speed)):
            v = getattr(hint, part)
            assert finite(v.x, v.y, v.z) and vector_length((v.x, v.y, v.z)) <= cap + EPS
    if action.eef_target is not None:
        p, q = action.eef_target.position, action.eef_target.orientation
        assert finite(p.x, p.y, p.z, q.x, q.y, q.z, q.w)
        assert abs(vector_length((q.x, q.y, q.z, q.w)) - 1.0) <= 1e-3
        if action.eef_target_mode is EefTargetMode.DELTA:
            assert vector_length((p.x, p.y, p.z)) <= limits.max_eef_step_m + EPS
            assert rotation_angle(q) <= limits.max_eef_step_rad + 1e-6
        else:
            for value, low, high in zip((p.x, p.y, p.z), limits.workspace_min,
                                        limits.workspace_max, strict=True):
                assert low <= value <= high
            reference = step_reference(published.target, context)
            if reference is not None:
                assert distance(reference.position, p) <= limits.max_eef_step_m + EPS
                r = reference.orientation
                if abs(vector_length((r.x, r.y, r.z, r.w)) - 1.0) <= 1e-3:
                    assert relative_angle(r, q) <= limits.max_eef_step_rad + 1e-6
            published.target = (action.eef_target, context.now_sec)


def step_reference(target, context: GuardContext):
    """The pose an absolute step is measured from: the last target, unless the
    observation's pose is known, finite and taken after it was due."""
    pose = context.eef_pose
    if pose is not None and not finite(pose.position.x, pose.position.y, pose.position.z):
        pose = None
    if target is None:
        return pose
    if pose is not None and context.observation_sec is not None \
            and context.observation_sec > target[1]:
        return pose
    return target[0]


def run_checked(guard: SafetyGuard, limits: GuardLimits, action: PolicyAction,
                context: GuardContext, published: Published):
    result = guard.check(action, context)
    if action.is_hold:
        assert result.action is action and not result.refused and not result.clamped
    elif result.refused:
        assert result.action == PolicyAction.hold(action.reference_frame)
        assert result.refusal_code in REFUSAL_CODES and result.refusal
        assert not action.is_hold
        guard.reset()  # as the node does
        published.reset()
    else:
        assert set(result.clamped) <= set(CLAMP_NAMES)
        assert (result.action == action) == (not result.clamped)
        assert_within_limits(limits, result.action, context, published)
    return result


PROPERTY = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(limits(), actions(), contexts)
def test_no_published_value_is_outside_any_limit(limits, action, context):
    run_checked(SafetyGuard(limits), limits, action, context, Published())


@PROPERTY
@given(limits(), st.lists(st.tuples(actions(), contexts, st.floats(-0.05, 0.5)),
                          min_size=2, max_size=12))
def test_no_published_value_is_outside_any_limit_over_a_sequence(limits, steps):
    guard, published, now = SafetyGuard(limits), Published(), 0.0
    for action, context, dt in steps:
        now += dt  # due times may step back a little (a new chunk's first step)
        run_checked(guard, limits, action, replace(context, now_sec=now), published)


@PROPERTY
@given(limits(), actions(), contexts)
def test_a_refusal_names_a_limit_and_is_counted(limits, action, context):
    guard = SafetyGuard(limits)
    result = guard.check(action, context)
    counts = guard.counts()
    if result.refused:
        assert counts[f"refused_{result.refusal_code}"] == 1
        assert guard.newest_refusal() == result.refusal
    else:
        assert sum(v for k, v in counts.items() if k.startswith("refused_")) == 0
    assert sum(v for k, v in counts.items() if k.startswith("clamped_")) == len(result.clamped)


# ---------------------------------------------------------------- the defaults


def test_the_stubs_answers_pass_the_default_limits_untouched():
    rng = np.random.default_rng(7)
    backend, guard = StubBackend(), SafetyGuard(GuardLimits())
    for step in range(200):
        image = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image[:] = rng.integers(0, 256)  # any brightness, so any gripper value
        joints = JointStateData(JOINTS.name, tuple(rng.uniform(-3.0, 3.0, 3)))
        action = backend.predict(Observation(joint_state=joints, image=image))
        # Steps a second apart at the least (the default rate is 5 Hz).
        result = guard.check(action, ctx(now=step * 0.2, joints=joints))
        assert result.action == action and not result.clamped and not result.refused


def test_a_chunked_backends_steps_pass_the_default_limits_untouched():
    guard = SafetyGuard(GuardLimits())
    chunk = chunk_steps(20, joint_count=3)
    for index, action in enumerate(chunk.actions):
        result = guard.check(action, ctx(now=index * CHUNK_PERIOD_SEC))
        assert result.action == action and not result.clamped


def test_openvla_like_absolute_steps_from_the_current_pose_pass_untouched():
    guard = SafetyGuard(GuardLimits())
    target = CURRENT
    for step in range(10):
        target = Pose(Vector3(target.position.x + 0.03, target.position.y - 0.02,
                              target.position.z + 0.01),
                      quaternion_multiply(quaternion_from_rpy(0.05, -0.05, 0.1),
                                          target.orientation))
        action = PolicyAction(eef_target=target, eef_target_mode=EefTargetMode.ABSOLUTE,
                              gripper_command=float(step % 2), confidence=0.0)
        result = guard.check(action, ctx(now=step * 0.2, eef=CURRENT))
        assert result.action == action and not result.clamped


def test_holds_pass_unchanged_and_change_nothing():
    guard = SafetyGuard(GuardLimits(min_confidence=0.5))
    hold = PolicyAction.hold("odom")
    assert guard.check(hold, ctx()).action is hold
    assert all(v == 0 for v in guard.counts().values())


# ---------------------------------------------------------------- each limit


def test_an_absolute_target_is_clamped_into_the_workspace_box():
    guard = SafetyGuard(GuardLimits(workspace_min=(0.0, -0.5, 0.1),
                                    workspace_max=(1.0, 0.5, 1.0), max_eef_step_m=10.0))
    action = PolicyAction(eef_target=Pose(Vector3(3.0, -2.0, 0.5)),
                          eef_target_mode=EefTargetMode.ABSOLUTE, confidence=0.5)
    result = guard.check(action, ctx())
    assert result.clamped == ("workspace",)
    assert result.action.eef_target.position == Vector3(1.0, -0.5, 0.5)
    assert result.action.eef_target.orientation == action.eef_target.orientation


def test_a_delta_step_is_scaled_down_keeping_its_direction():
    guard = SafetyGuard(GuardLimits(max_eef_step_m=0.1))
    action = PolicyAction(eef_target=Pose(Vector3(0.3, 0.0, 0.4)), confidence=0.5)
    result = guard.check(action, ctx())
    p = result.action.eef_target.position
    assert result.clamped == ("eef_step_m",)
    assert (p.x, p.y, p.z) == pytest.approx((0.06, 0.0, 0.08))


def test_a_delta_rotation_is_cut_about_its_axis():
    guard = SafetyGuard(GuardLimits(max_eef_step_rad=0.2))
    action = PolicyAction(eef_target=Pose(orientation=quaternion_from_rpy(0.0, 0.0, 1.0)),
                          confidence=0.5)
    result = guard.check(action, ctx())
    assert result.clamped == ("eef_step_rad",)
    q = result.action.eef_target.orientation
    assert rotation_angle(q) == pytest.approx(0.2)
    assert q.x == q.y == 0.0 and q.z > 0  # still about +z


def test_absolute_steps_are_capped_from_the_current_pose_then_from_the_last_target():
    guard = SafetyGuard(GuardLimits(max_eef_step_m=0.05, max_eef_step_rad=0.1))
    far = Pose(Vector3(0.35, 0.05, 0.65), quaternion_from_rpy(0.0, 0.0, 0.0))
    action = PolicyAction(eef_target=far, eef_target_mode=EefTargetMode.ABSOLUTE,
                          confidence=0.5)
    first = guard.check(action, ctx(eef=CURRENT)).action.eef_target
    assert first.position.z == pytest.approx(0.30)  # 5 cm up from the current pose
    assert relative_angle(CURRENT.orientation, first.orientation) == pytest.approx(0.1)
    second = guard.check(action, ctx(eef=CURRENT)).action.eef_target
    assert second.position.z == pytest.approx(0.35)  # from the last target, not the pose
    guard.reset()
    third = guard.check(action, ctx(eef=CURRENT)).action.eef_target
    assert third.position.z == pytest.approx(0.30)


def test_a_pose_observed_after_the_last_target_is_the_newer_reference():
    guard = SafetyGuard(GuardLimits(max_eef_step_m=0.05))
    moved = Pose(Vector3(0.35, 0.05, 0.60), CURRENT.orientation)  # e.g. moved by hand
    action = PolicyAction(eef_target=Pose(Vector3(0.35, 0.05, 0.62), CURRENT.orientation),
                          eef_target_mode=EefTargetMode.ABSOLUTE, confidence=0.5)
    guard.check(replace(action, eef_target=CURRENT), ctx(now=1.0, eef=CURRENT))
    # Observed before the last target was due: the target is the reference (cut to 5 cm).
    stale = guard.copy().check(action, GuardContext(1.1, JOINTS, moved, observation_sec=0.9))
    assert stale.action.eef_target.position.z == pytest.approx(0.30)
    # Observed after it: the measured pose is; 2 cm from it pass untouched.
    fresh = guard.check(action, GuardContext(2.0, JOINTS, moved, observation_sec=1.5))
    assert fresh.action == action


def test_an_absolute_target_from_a_pose_outside_the_workspace_is_refused():
    guard = SafetyGuard(GuardLimits())
    outside = Pose(Vector3(2.0, 0.0, 0.0))
    action = PolicyAction(eef_target=Pose(Vector3(1.4, 0.0, 0.0)),
                          eef_target_mode=EefTargetMode.ABSOLUTE, confidence=0.5)
    result = guard.check(action, ctx(eef=outside))
    assert result.refusal_code == "reference_outside_workspace"
    assert "outside the workspace" in result.refusal


def test_an_unknown_current_pose_leaves_the_box_alone_to_apply():
    guard = SafetyGuard(GuardLimits(max_eef_step_m=0.01))
    unknown = Pose(Vector3(math.nan, 0.0, 0.0), Quaternion(0.0, 0.0, 0.0, 0.0))
    action = PolicyAction(eef_target=Pose(Vector3(0.5, 0.0, 0.5)),
                          eef_target_mode=EefTargetMode.ABSOLUTE, confidence=0.5)
    result = guard.check(action, ctx(eef=unknown))
    assert result.action == action


def test_joint_deltas_are_clamped_per_joint():
    limits = GuardLimits(max_joint_delta=0.1, joint_limit_names=("elbow",),
                         joint_max_deltas=(0.3,), joint_position_min=(-0.4,),
                         joint_position_max=(0.0,))
    guard = SafetyGuard(limits)
    result = guard.check(PolicyAction(joint_deltas=(0.5, -0.5, -0.05), confidence=0.5), ctx())
    # shoulder: the global cap; elbow (at -0.2): its position range first, then its cap;
    # wrist: within the cap.
    assert result.action.joint_deltas == pytest.approx((0.1, -0.2, -0.05))
    assert set(result.clamped) == {"joint_delta", "joint_position"}


def test_a_limited_joint_at_an_unknown_position_does_not_move():
    limits = GuardLimits(joint_limit_names=("elbow",), joint_position_min=(-1.0,),
                         joint_position_max=(1.0,))
    joints = JointStateData(JOINTS.name, (0.3, math.nan, 0.9))
    result = SafetyGuard(limits).check(
        PolicyAction(joint_deltas=(0.01, 0.01, 0.01), confidence=0.5), ctx(joints=joints)
    )
    assert result.action.joint_deltas == (0.01, 0.0, 0.01)


def test_named_joint_deltas_get_the_limits_of_the_joint_they_name():
    # The state is (shoulder 0.3, elbow -0.2, wrist 0.9); the action names wrist first.
    limits = GuardLimits(max_joint_delta=0.5, joint_limit_names=("wrist", "shoulder"),
                         joint_max_deltas=(0.05, 0.5), joint_position_min=(-1.0, -1.0),
                         joint_position_max=(1.0, 0.35))
    result = SafetyGuard(limits).check(
        PolicyAction(joint_deltas=(0.3, 0.3), joint_names=("wrist", "shoulder"),
                     confidence=0.5), ctx()
    )
    # wrist: its own cap 0.05; shoulder (at 0.3): up to its maximum 0.35.
    assert result.action.joint_deltas == pytest.approx((0.05, 0.05))
    assert result.action.joint_names == ("wrist", "shoulder")
    assert set(result.clamped) == {"joint_delta", "joint_position"}


def test_absolute_joint_targets_are_clamped_into_their_joints_range():
    limits = GuardLimits(max_joint_delta=10.0, joint_limit_names=("elbow", "wrist"),
                         joint_position_min=(-0.5, 0.0), joint_position_max=(0.5, 1.0))
    action = PolicyAction(joint_positions=(2.0, -3.0, 0.4),
                          joint_names=("wrist", "elbow", "shoulder"), confidence=0.5)
    result = SafetyGuard(limits).check(action, ctx())
    assert result.action.joint_positions == pytest.approx((1.0, -0.5, 0.4))
    assert result.clamped == ("joint_position",)
    unnamed = SafetyGuard(limits).check(
        PolicyAction(joint_positions=(0.4, -3.0, 2.0), confidence=0.5), ctx())
    assert unnamed.action.joint_positions == pytest.approx((0.4, -0.5, 1.0))


def test_an_absolute_joint_target_steps_at_most_the_cap_from_where_the_joint_is():
    # shoulder at 0.3, elbow at -0.2: capped at 0.1 (elbow: its own 0.05), direction kept.
    limits = GuardLimits(max_joint_delta=0.1, joint_limit_names=("elbow",),
                         joint_max_deltas=(0.05,))
    action = PolicyAction(joint_positions=(1.3, -1.2, 0.95), confidence=0.5)
    result = SafetyGuard(limits).check(action, ctx())
    assert result.action.joint_positions == pytest.approx((0.4, -0.25, 0.95))
    assert result.clamped == ("joint_delta",)


def test_a_chunks_joint_targets_step_from_the_previous_target_until_a_newer_observation():
    guard = SafetyGuard(GuardLimits(max_joint_delta=0.1))
    seen = GuardContext(0.0, JOINTS, observation_sec=0.0)
    # A chunk moving the elbow (at -0.2) by 0.08 per step: each step within the cap of the
    # one before, though the fifth is 0.4 from where the elbow was seen.
    for step in range(1, 6):
        target = -0.2 + 0.08 * step
        result = guard.check(
            PolicyAction(joint_positions=(target,), joint_names=("elbow",), confidence=0.5),
            replace(seen, now_sec=0.1 * step),
        )
        assert result.action.joint_positions == (target,) and not result.clamped
    # A jump is cut from the last target let out (0.2) ...
    jump = PolicyAction(joint_positions=(1.0,), joint_names=("elbow",), confidence=0.5)
    assert guard.check(jump, replace(seen, now_sec=0.6)).action.joint_positions == \
        pytest.approx((0.3,))
    # ... and from the observation once one was taken after that target was due.
    newer = GuardContext(0.8, JointStateData(("elbow",), (0.0,)), observation_sec=0.75)
    assert guard.check(jump, newer).action.joint_positions == pytest.approx((0.1,))
    guard.reset()
    assert guard.check(jump, seen).action.joint_positions == pytest.approx((-0.1,))


def test_the_gripper_is_rate_limited_between_due_times():
    guard = SafetyGuard(GuardLimits(max_gripper_rate=2.0))
    first = guard.check(PolicyAction(gripper_command=1.0, confidence=0.5), ctx(now=10.0))
    assert first.action.gripper_command == 1.0  # nothing to compare with
    later = guard.check(PolicyAction(gripper_command=0.0, confidence=0.5), ctx(now=10.1))
    assert later.action.gripper_command == pytest.approx(0.8)
    assert later.clamped == ("gripper_rate",)
    earlier = guard.check(PolicyAction(gripper_command=0.0, confidence=0.5), ctx(now=10.0))
    assert earlier.action.gripper_command == pytest.approx(0.8)  # due before: no change


def test_no_gripper_rate_limit_at_zero():
    guard = SafetyGuard(GuardLimits(max_gripper_rate=0.0))
    guard.check(PolicyAction(gripper_command=1.0, confidence=0.5), ctx(now=0.0))
    result = guard.check(PolicyAction(gripper_command=0.0, confidence=0.5), ctx(now=0.0))
    assert result.action.gripper_command == 0.0


def test_base_hints_are_scaled_down_keeping_their_direction():
    guard = SafetyGuard(GuardLimits(max_base_linear_speed=0.5, max_base_angular_speed=1.0))
    hint = Twist(Vector3(3.0, 4.0, 0.0), Vector3(0.0, 0.0, -2.0))
    result = guard.check(PolicyAction(base_velocity_hint=hint, confidence=0.5), ctx())
    out = result.action.base_velocity_hint
    assert (out.linear.x, out.linear.y) == pytest.approx((0.3, 0.4))
    assert out.angular.z == pytest.approx(-1.0)
    assert result.clamped == ("base_linear_speed", "base_angular_speed")


@pytest.mark.parametrize(
    ("action", "code", "says"),
    [
        (PolicyAction(confidence=0.12), "confidence", "confidence 0.12 below min_confidence=0.3"),
        (PolicyAction(confidence=1.5), "confidence", "outside [0, 1]"),
        (PolicyAction(confidence=math.nan), "non_finite", "confidence is nan"),
        (PolicyAction(joint_deltas=(0.0, math.inf, 0.0), confidence=0.5), "non_finite",
         "joint_deltas[1] is inf"),
        (PolicyAction(eef_target=Pose(orientation=Quaternion(0, 0, 0, 2)), confidence=0.5),
         "non_unit_quaternion", "length 2"),
        (PolicyAction(gripper_command=-0.5, confidence=0.5), "gripper_range", "-0.5"),
        (PolicyAction(joint_positions=(0.0, math.nan, 0.0), confidence=0.5), "non_finite",
         "joint_positions[1] is nan"),
        (PolicyAction(joint_positions=(0.1,), joint_names=("gripper_finger",), confidence=0.5),
         "unknown_joint_position", "joint 'gripper_finger'"),
        (PolicyAction(joint_positions=(0.1, 0.2), joint_names=("elbow",), confidence=0.5),
         "joint_names", "joint_positions has 2 values for 1 joint_names"),
        (PolicyAction(joint_deltas=(0.1, 0.2), joint_names=("elbow", "wrist", "shoulder"),
                      confidence=0.5), "joint_names", "joint_deltas has 2 values"),
        (PolicyAction(joint_positions=(0.1, 0.2), joint_names=("elbow", "elbow"),
                      confidence=0.5), "joint_names", "twice"),
    ],
)
def test_what_cannot_be_clamped_is_refused_with_a_reason(action, code, says):
    guard = SafetyGuard(GuardLimits(min_confidence=0.3))
    result = guard.check(action, ctx())
    assert result.refusal_code == code and says in result.refusal
    assert result.action.is_hold and result.clamped == ()


def test_huge_finite_values_are_clamped_not_overflowed():
    guard = SafetyGuard(GuardLimits())
    action = PolicyAction(eef_target=Pose(Vector3(1e308, 1e308, -1e308)),
                          base_velocity_hint=Twist(Vector3(1e308, 1e308, 0.0)), confidence=0.5)
    out = guard.check(action, ctx()).action
    p = out.eef_target.position
    assert vector_length((p.x, p.y, p.z)) == pytest.approx(0.1)
    assert p.x > 0 and p.z < 0


def test_a_reckless_chunk_is_clamped_step_by_step_and_refused_where_unsure():
    # What test_guard_nodes expects both nodes to publish for this chunk.
    defaults = GuardLimits()
    guard = SafetyGuard(replace(defaults, **RECKLESS_LIMITS))
    chunk = reckless_chunk()
    period = chunk.action_period_sec
    results = [guard.check(action, ctx(now=i * period))
               for i, action in enumerate(chunk.actions[:4])]
    assert results[0].action == chunk.actions[0] and not results[0].clamped
    leap = results[1].action
    assert results[1].clamped == ("eef_step_m", "joint_delta", "gripper_rate")
    assert (leap.eef_target.position.x, leap.eef_target.position.z) == pytest.approx((0.06, 0.08))
    assert leap.joint_deltas == (0.25, -0.25, 0.0)
    assert leap.gripper_command == pytest.approx(2.0 * period)  # 2.0 per second
    boxed = results[2].action
    assert results[2].clamped == ("workspace", "base_linear_speed")
    assert boxed.eef_target.position == Vector3(1.5, 0.0, 0.2)
    assert (boxed.base_velocity_hint.linear.x, boxed.base_velocity_hint.linear.y) == \
        pytest.approx((0.3, 0.4))
    assert results[3].refusal == "confidence 0.1 below min_confidence=0.3"
    assert results[3].action.is_hold


# ---------------------------------------------------------------- the guard object


def test_a_copy_previews_without_touching_the_guard():
    guard = SafetyGuard(GuardLimits(max_gripper_rate=1.0))
    guard.check(PolicyAction(gripper_command=0.0, confidence=0.5), ctx(now=0.0))
    preview = guard.copy()
    assert preview.check(PolicyAction(gripper_command=1.0, confidence=0.5),
                         ctx(now=0.5)).action.gripper_command == pytest.approx(0.5)
    assert guard.counts()["clamped_gripper_rate"] == 0
    result = guard.check(PolicyAction(gripper_command=1.0, confidence=0.5), ctx(now=0.2))
    assert result.action.gripper_command == pytest.approx(0.2)  # its own reference


def test_updated_limits_apply_to_the_next_check():
    guard = SafetyGuard(GuardLimits())
    action = PolicyAction(confidence=0.2)
    assert not guard.check(action, ctx()).refused
    guard.update_limits(GuardLimits(min_confidence=0.5))
    assert guard.check(action, ctx()).refused


def test_the_guard_is_safe_to_call_from_two_threads():
    guard = SafetyGuard(GuardLimits(max_joint_delta=0.1))
    action = PolicyAction(joint_deltas=(1.0, 1.0, 1.0), confidence=0.5)

    def work():
        for _ in range(500):
            guard.check(action, ctx())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert guard.counts()["clamped_joint_delta"] == 2000


# ---------------------------------------------------------------- limits and parameters


def test_one_parameter_per_limit_with_the_limits_defaults():
    specs = specs_by_name(GUARD_PARAMETERS)
    assert list(specs) == [f.name for f in fields(GuardLimits)]
    defaults = GuardLimits()
    for name, spec in specs.items():
        assert spec.default == getattr(defaults, name)
        assert spec.problem(spec.default) is None, name
    assert GuardLimits.from_values({n: s.default for n, s in specs.items()}) == defaults


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"workspace_min": [0.0, 0.0, 2.0]}, "workspace_min[2]=2 must be below"),
        ({"joint_limit_names": ["a", "b"], "joint_max_deltas": [0.1]},
         "joint_max_deltas must be empty or hold one value per joint_limit_names entry"),
        ({"joint_limit_names": ["a"], "joint_position_min": [0.0]},
         "joint_position_min and joint_position_max must be given together"),
        ({"joint_limit_names": ["a"], "joint_position_min": [1.0],
          "joint_position_max": [0.0]}, "joint_position_min[0]=1 must be finite and at most"),
    ],
)
def test_limits_that_disagree_are_refused_naming_the_field(changes, says):
    specs = specs_by_name(GUARD_PARAMETERS)
    current = {n: s.default for n, s in specs.items()}
    assert says in changes_problem(specs, changes, current)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("workspace_min", [0.0, 0.0], "must hold 3 numbers"),
        ("workspace_max", [1.0, "x", 1.0], "expected a list of float"),
        ("workspace_max", 1.0, "expected a list of float"),
        ("joint_limit_names", ["a", "a"], "twice"),
        ("joint_max_deltas", [0.0], "must be a finite number within"),
        ("max_eef_step_rad", 4.0, "at most 3.14159"),
        ("min_confidence", 1.5, "at most 1"),
        ("max_gripper_rate", -1.0, ">= 0"),
    ],
)
def test_each_guard_parameter_has_a_range(name, value, says):
    specs = specs_by_name(GUARD_PARAMETERS)
    assert says in changes_problem(specs, {name: value})


def test_integers_and_arrays_are_taken_as_the_parameters_types():
    spec = specs_by_name(GUARD_PARAMETERS)["workspace_min"]
    assert spec.problem([-1, -1, 0]) is None
    assert spec.normalized([-1, -1, 0]) == (-1.0, -1.0, 0.0)
