"""replay: what a policy would have commanded on a recorded episode, compared.

Reads a rosbag2 recording (MCAP or sqlite3) of a robot's camera, joint states,
end-effector pose, task and, where recorded, the node's own outputs; runs every
observation the node would have sent through the chosen policy path, in simulated
time, through the node's own input pairing, executor and safety guard; writes the
commands as an MCAP bag; compares them step by step with the recorded outputs (or
with another replay, --compare-with) and exits 1 when they differ beyond the
tolerances (2: the input could not be used).

  python3 -m manipulation_policy.replay episode/ --backend stub --output replay_stub
  python3 -m manipulation_policy.replay episode/ --server http://gpu:5000 \\
      --params-file robot_params.yaml --output replay_new --compare-with replay_old
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from manipulation_policy.replay.errors import ReplayInputError

PROG = "replay"
EXIT_PASSED, EXIT_BREACH, EXIT_BAD_INPUT = 0, 1, 2
TOPIC_FLAGS = (
    "camera_topic", "image_transport", "joint_states_topic", "eef_pose_topic",
    "observation_topic", "instruction_topic", "output_topic", "chunk_topic",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not within 0..1")
    return value


def _tolerance(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a tolerance (>= 0)")
    return value


def build_parser(backend: str = "") -> argparse.ArgumentParser:
    from manipulation_policy.policy_server import add_backend_option_flags
    from manipulation_policy.replay.comparison import Tolerances

    parser = _Parser(prog=PROG, description=__doc__.split("\n", 1)[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bag", help="rosbag2 folder (or .mcap / .db3 file) of the episode")
    path = parser.add_argument_group("policy path (one of)")
    choice = path.add_mutually_exclusive_group(required=True)
    choice.add_argument("--server", metavar="URL",
                        help="the policy server, through the remote node's HTTP client")
    choice.add_argument("--backend", metavar="NAME",
                        help="stub | openvla | module.path:ClassName, in this process")
    path.add_argument("--api-key-file", metavar="FILE",
                      help="the server's key (default: the remote node's: the "
                      "MANIPULATION_POLICY_API_KEY environment variable)")
    node = parser.add_argument_group("the node replayed")
    node.add_argument("--params-file", metavar="YAML",
                      help="the node's params file (rcl's section rules: policy_node's "
                      "sections with --backend, remote_policy_node's with --server)")
    node.add_argument("--namespace", default="", help="the node's namespace")
    node.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                      help="a node parameter (value read as YAML), after the params file")
    for name in TOPIC_FLAGS:
        node.add_argument("--" + name.replace("_", "-"), dest=name, metavar="TOPIC"
                          if name != "image_transport" else "raw|compressed",
                          help=f"the node's {name} parameter")
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, metavar="BAG",
                     help="the MCAP bag (a folder) of the replayed commands; must not exist")
    out.add_argument("--compare-with", metavar="BAG",
                     help="compare with this bag's outputs (another replay, a recording) "
                     "instead of the outputs recorded in BAG")
    out.add_argument("--report-json", metavar="FILE", help="the comparison as JSON")
    out.add_argument("--plot", metavar="PNG", help="the two runs' commands over time")
    out.add_argument("--msgs-dir", help="manipulation_msgs' msg folder (found by itself "
                     "in a checkout or a sourced workspace)")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="a progress bar (default: when stderr is a terminal)")
    defaults = Tolerances()
    tolerance = parser.add_argument_group("tolerances (a step is within when all are)")
    tolerance.add_argument("--position-tolerance", type=_tolerance, default=defaults.position_m,
                           metavar="M", help="end-effector target position, metres")
    tolerance.add_argument("--rotation-tolerance", type=_tolerance,
                           default=defaults.rotation_rad, metavar="RAD",
                           help="end-effector target orientation, radians")
    tolerance.add_argument("--joint-tolerance", type=_tolerance, default=defaults.joint,
                           metavar="D", help="largest joint-delta difference")
    tolerance.add_argument("--gripper-tolerance", type=_tolerance, default=defaults.gripper,
                           metavar="G", help="gripper command difference")
    tolerance.add_argument("--min-within", type=_fraction, default=defaults.min_share,
                           metavar="SHARE", help="share of steps that must be within (0..1)")
    add_backend_option_flags(parser.add_argument_group("backend options (--backend)"), backend)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from manipulation_policy.replay.node_settings import assignments

    overrides = assignments(args.param)
    for name in TOPIC_FLAGS:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.server:
        overrides["remote_url"] = args.server
        if args.api_key_file:
            overrides["remote_api_key_file"] = args.api_key_file
    elif args.backend:
        overrides["backend"] = args.backend
    return overrides


def _source(args: argparse.Namespace, values: dict[str, Any]):
    from manipulation_policy.replay.action_sources import LocalSource, ServerSource

    if args.server:
        return ServerSource(values)
    from manipulation_policy.policy_server import StartupError, backend_arguments, load_backend
    from manipulation_policy.robot.node_parameters import parameter_backend_arguments

    try:
        options = parameter_backend_arguments(values)
        options.update(backend_arguments(args, os.environ))
        return LocalSource(load_backend(values["backend"], options))
    except StartupError as exc:
        raise ReplayInputError(str(exc)) from None


def replay(args: argparse.Namespace) -> int:
    from manipulation_policy.replay.bag_input import RECORDED_OUTPUT, InputTopics, RecordedBag
    from manipulation_policy.replay.bag_output import OutputBag, check_destination
    from manipulation_policy.replay.bag_types import message_typestore
    from manipulation_policy.replay.node_settings import LOCAL_NODE, REMOTE_NODE, node_values
    from manipulation_policy.replay.progress import Progress
    from manipulation_policy.replay.runs import RunRecorder, run_from_bag, run_from_outputs
    from manipulation_policy.replay.simulated_node import SimulatedNode

    store = message_typestore(args.msgs_dir)
    # The params file's sections of the node the path stands for.
    values = node_values(
        REMOTE_NODE if args.server else LOCAL_NODE, args.backend or "", args.params_file,
        args.namespace, _overrides(args),
    )
    topics = InputTopics.from_values(values)
    check_destination(Path(args.output))
    with RecordedBag(args.bag, store) as bag:
        kinds = bag.check_inputs(topics)
        recorded = RunRecorder(f"recorded {Path(args.bag).name}", with_requests=False)
        source = _source(args, values)
        try:
            _check_policy_inputs(source, values)
        except BaseException:
            source.close()
            raise
        name = f"replay {args.server or args.backend}"
        print(f"{PROG}: {Path(args.bag).name} through {source.describe()}", file=sys.stderr)
        try:
            with OutputBag(args.output, store, values["output_topic"],
                           values["chunk_topic"]) as output:
                node = SimulatedNode(values, source, output.write,
                                     _robot_id(args, REMOTE_NODE if args.server else LOCAL_NODE))
                enabled = sys.stderr.isatty() if args.progress is None else args.progress
                progress = Progress(bag.message_count(kinds), enabled)
                for kind, time_ns, msg in bag.messages(kinds):
                    progress.advance()
                    if kind == RECORDED_OUTPUT:
                        recorded.output(time_ns, msg)
                        node.advance_to(time_ns)  # the node's timers ran meanwhile
                    else:
                        node.receive(kind, time_ns, msg)
                node.finish()
                progress.close()
        finally:
            source.close()
    print(f"{PROG}: {len(node.outputs.commands)} commands, {len(node.outputs.chunks)} "
          f"chunks, {node.counts.requests} requests ({node.counts.failed} failed) -> "
          f"{args.output}", file=sys.stderr)
    skipped = node.skipped_reasons()
    for reason, count in skipped.items():
        print(f"{PROG}: {count} camera set(s) not sent: {reason}", file=sys.stderr)
    candidate = run_from_outputs(name, node.outputs)
    if args.compare_with:
        baseline = run_from_bag(args.compare_with, store, values["output_topic"],
                                f"{Path(args.compare_with).name}")
    else:
        baseline = recorded.run
        if not baseline.steps:
            print(f"{PROG}: no outputs recorded on {topics.output} in the bag: nothing to "
                  "compare (give --compare-with)", file=sys.stderr)
            if args.report_json:  # what the replay did, without a comparison
                from manipulation_policy.replay.report import report_json, write_whole

                text = report_json(None, [], node.count_summary(), skipped)
                write_whole(args.report_json, lambda path: path.write_text(text + "\n"))
            return EXIT_PASSED
    return _compare(args, baseline, candidate, node.count_summary(), skipped)


def _robot_id(args: argparse.Namespace, node: str) -> str:
    """The node's fully qualified name, which it sends as ``robot_id``."""
    namespace = args.namespace.strip("/")
    return f"/{namespace}/{node}" if namespace else f"/{node}"


def _check_policy_inputs(source, values: dict[str, Any]) -> None:
    """Refuse, in one line as the node's configure does, cameras and a state that do
    not fit what the policy declares it reads."""
    from manipulation_policy.robot.camera_inputs import StateLayout, configuration_problem

    required = source.inputs()
    if required is None:
        return
    problem = configuration_problem(
        required, values["camera_names"], StateLayout.from_values(values)
    )
    if problem is not None:
        raise ReplayInputError(problem)


def _compare(
    args: argparse.Namespace, baseline, candidate, counts: dict[str, int],
    skipped: dict[str, int],
) -> int:
    from manipulation_policy.replay.comparison import Tolerances, compare_steps, summarize
    from manipulation_policy.replay.report import report_json, table, write_whole

    tolerances = Tolerances(args.position_tolerance, args.rotation_tolerance,
                            args.joint_tolerance, args.gripper_tolerance, args.min_within)
    diffs = compare_steps(baseline.steps, candidate.steps, tolerances)
    summary = summarize(baseline, candidate, diffs, tolerances)
    print(table(summary, counts))
    if args.report_json:
        text = report_json(summary, diffs, counts, skipped)
        write_whole(args.report_json, lambda path: path.write_text(text + "\n"))
    if args.plot:
        from manipulation_policy.replay.plot import draw

        write_whole(args.plot, lambda path: draw(baseline, candidate, path))
    return EXIT_PASSED if summary.passed else EXIT_BREACH


def main(argv: Optional[Sequence[str]] = None) -> int:
    from manipulation_policy.policy_server import backend_flag

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(backend_flag(argv)).parse_args(argv)
    try:
        return replay(args)
    except ReplayInputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
