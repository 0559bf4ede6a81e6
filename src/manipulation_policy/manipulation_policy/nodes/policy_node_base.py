"""What both policy nodes share: inputs, the rate, the worker, parameters, publishing.

The nodes differ only in their *action source*, a callable
``Observation -> ActionChunk | PolicyAction | None``: the in-process node calls
a backend, the remote node calls the policy server. A chunk goes onto the
action timeline of a ``robot.executor.ChunkExecutor`` on the node clock (the
same code in both nodes): it is published whole on ``chunk_topic``, and each
step as a PolicyOutput when it is due, by the worker on arrival and by a
timer every ``EXECUTOR_TICK_SEC`` after (``node_execution``); a chunk of one goes out on arrival, as
before chunks existed. A PolicyAction (a failure's hold) is published at
once and ends the plan; None publishes nothing. The next frame goes to the
worker only when the timeline has no more than ``refill_horizon_sec`` left.

Threading: subscriptions only store the newest message. The newest fresh frame
goes to one worker thread that runs the action source and publishes; while the
worker is busy, frames are skipped (never queued), so the executor thread that
receives images and joint states never waits for inference.

Rate: a frame is handed over as soon as it arrives, unless the previous one
was handed over less than one period (1 / ``inference_rate``) ago; a timer at
``inference_rate`` picks up a frame that arrived inside that window. Waiting
for the timer alone would add up to a whole period of latency to every output.
These decisions (rate, task, staleness, which EEF pose goes along) are made
by ``robot/scheduling.FrameScheduler``.

Inputs: the raw topics (camera, joint states, end-effector pose) and, with
``use_observation``, the aggregated ``manipulation_msgs/Observation`` of a
perception node; ``robot/observation_inputs.select_inputs`` chooses between them
by the aggregated observation's freshness, each time a frame may go.

The node is composed of one part per job, each a mixin in its own module that
owns its state: ``parameter_handling`` (declaration, checks, live changes),
``node_inputs`` (subscriptions, input selection), ``node_execution`` (scheduling,
the worker, the action timeline) and ``node_publishing`` (outputs, chunks,
diagnostics). This module builds them in order, reacts to accepted parameter
changes across them, keeps the shared counters and shuts down.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional

import rclpy
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node

from manipulation_policy.nodes.node_execution import ActionSource, NodeExecution
from manipulation_policy.nodes.node_inputs import NodeInputs
from manipulation_policy.nodes.node_publishing import NodePublishing
from manipulation_policy.nodes.parameter_handling import NodeParameters
from manipulation_policy.robot.node_parameters import ParameterSpec
from manipulation_policy.robot.scheduling import task_active_at_start

__all__ = ["ActionSource", "PolicyNodeBase", "run_node"]


class PolicyNodeBase(NodeParameters, NodeInputs, NodeExecution, NodePublishing, Node):
    """The shared node; subclasses supply the action source through two hooks.

    - ``create_action_source()``: called once, after parameters are declared.
    - ``parameters_changed(changed)``: called after live parameters were accepted.
    """

    # remote_policy_node sets this: upstream's use_remote:=true then means "this node".
    remote = False

    def __init__(self, node_name: str, extra_parameters: Sequence[ParameterSpec], **node_kwargs):
        super().__init__(node_name, **node_kwargs)
        self._ready = False
        self._closing = False
        # Guards the inputs' latest messages and the counters.
        self._state_lock = threading.Lock()
        self._counters = {
            "images": 0,
            "joint_states": 0,
            "observations": 0,
            "from_observation": 0,
            "unsupported_images": 0,
            "inferences": 0,
            "published": 0,
            "no_action": 0,
            "answers_after_task": 0,
            "publish_failed": 0,
            "chunks_accepted": 0,
            "chunks_refused": 0,
            "underrun_holds": 0,
        }
        self._init_scheduling()
        self._init_inputs()
        upstream = self._declare_parameters(extra_parameters)
        values = self.parameter_values()
        if task_active_at_start(values["wait_for_task"], upstream.task_given):
            self._scheduler.start_task()
        self._init_executor(values)
        self._init_publishing()

        self.action_source: ActionSource = self.create_action_source()

        self._subscribe_to_inputs(values)
        self._create_publishers(values)
        self._start_diagnostics()
        self._start_execution(node_name, values)
        self._ready = True
        self.get_logger().info(
            f"listening to {self._camera_topic} ({values['image_transport']})"
            + (f" and {self._observation_topic} (aggregated observation)"
               if values["use_observation"] else "")
            + f", publishing {values['output_topic']} at {values['inference_rate']:g} Hz; "
            f"tasks on {self._task_topic}"
        )

    # ------------------------------------------------------------ hooks

    def create_action_source(self) -> ActionSource:
        raise NotImplementedError

    def parameters_changed(self, changed: dict[str, Any]) -> None:
        """Live parameters in ``changed`` were just accepted (values already current)."""

    # ------------------------------------------------------------ across the parts

    def _react_to(self, changes: dict[str, Any]) -> None:
        """What accepted live parameter changes set in motion (values already current)."""
        self._execution_parameters_changed(changes)
        self._guard_parameters_changed(changes)
        if "use_observation" in changes:
            self._use_observation_changed(changes["use_observation"])
        if "inference_rate" in changes:
            self._rate_changed(changes["inference_rate"])

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot: inputs received, frames skipped (stale, busy), inferences, outputs."""
        with self._state_lock:
            counters = dict(self._counters)
        counters.update(self._scheduler.counts())
        return counters

    def _count(self, name: str) -> None:
        with self._state_lock:
            self._counters[name] += 1

    # ------------------------------------------------------------ shutdown

    def close_action_source(self) -> None:
        close = getattr(self.action_source, "close", None)
        if callable(close):
            close()

    def destroy_node(self) -> None:
        if self._closing:
            return
        self._closing = True
        if hasattr(self, "_worker"):
            if hasattr(self, "action_source"):
                self.close_action_source()
            self._stop_worker()
        super().destroy_node()


def run_node(factory: Callable[[], Node], args: Optional[list[str]] = None) -> int:
    """main() of a policy node: spin until Ctrl-C or shutdown; clear errors, no tracebacks."""
    rclpy.init(args=args)
    executor = SingleThreadedExecutor()
    node = None
    try:
        node = factory()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, ParameterException) as exc:
        # Bad start parameters, unknown backend, unloadable model: say which and stop.
        print(f"error: {exc}", flush=True)
        return 2
    except Exception:
        if rclpy.ok():
            raise
        # Ctrl-C while starting (e.g. loading a model): rclpy shut the context down under us.
    finally:
        # `ros2 launch` forwards Ctrl-C as a second SIGINT, which would interrupt the
        # cleanup (an in-flight inference may take a moment) with a traceback.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if node is not None:
            node.destroy_node()
        executor.shutdown(timeout_sec=1.0)
        rclpy.try_shutdown()
    return 0
