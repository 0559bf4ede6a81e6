"""The two runs' commands over time, one panel per quantity, as a PNG (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from manipulation_policy.replay.comparison import Run

# (panel title, value of a command or None where it has none)
QUANTITIES = (
    ("target x (m)", lambda a: a.eef_target.position.x if a.eef_target else None),
    ("target y (m)", lambda a: a.eef_target.position.y if a.eef_target else None),
    ("target z (m)", lambda a: a.eef_target.position.z if a.eef_target else None),
    ("gripper", lambda a: a.gripper_command),
    ("joint delta 0", lambda a: a.joint_deltas[0] if a.joint_deltas else None),
    ("joint target 0", lambda a: a.joint_positions[0] if a.joint_positions else None),
)


def draw(baseline: Run, candidate: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a CI runner or a GPU host
    import matplotlib.pyplot as plt

    starts = [s.due_ns for run in (baseline, candidate) for s in run.steps]
    origin = min(starts, default=0)
    figure, axes = plt.subplots(len(QUANTITIES), 1, sharex=True,
                                figsize=(10, 2.2 * len(QUANTITIES)))
    for axis, (title, value) in zip(axes, QUANTITIES, strict=True):
        for run, style in ((baseline, "-o"), (candidate, "--x")):
            points = sorted((s.due_ns, value(s.action)) for s in run.steps)
            xs = [(due - origin) / 1e9 for due, v in points if v is not None]
            ys = [v for _, v in points if v is not None]
            axis.plot(xs, ys, style, markersize=3, label=run.name)
        axis.set_ylabel(title)
        axis.grid(True, alpha=0.3)
    axes[0].legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("due time (s from the first command)")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=90)
    plt.close(figure)
