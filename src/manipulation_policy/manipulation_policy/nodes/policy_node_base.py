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
goes to a worker thread that runs the action source and publishes (one thread;
the remote node's ``remote_max_in_flight`` threads); while every one is busy,
frames are skipped (never queued), so the executor thread that receives images
and joint states never waits for inference.

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

Lifecycle: the node is a managed node. Construction declares the parameters and
subscribes (inputs, e-stop); ``configure`` makes the action source (loads the model,
or checks the policy server) and the worker; ``activate`` starts the timers and lets
commands out; ``deactivate`` publishes one hold and stops them; ``cleanup`` and
``shutdown`` release the action source. With ``autostart`` (the default) the node
configures and activates itself at start, as a plain node would; a failed configure
leaves it unconfigured with its reason logged, and the remote node tries again every
``AUTOSTART_RETRY_SEC`` (a server may come up later).

The node is composed of one part per job, each a mixin in its own module that
owns its state: ``parameter_handling`` (declaration, checks, live changes),
``node_inputs`` (subscriptions, input selection), ``node_execution`` (scheduling,
the worker, the action timeline), ``node_safety`` (e-stop, input watchdog, dry run)
and ``node_publishing`` (outputs, chunks, diagnostics). This module builds them in
order, runs the lifecycle transitions, reacts to accepted parameter changes across
them, keeps the shared counters and shuts down.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional

import rclpy
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node

from manipulation_policy.core.policy_types import PolicyInputs
from manipulation_policy.nodes.node_execution import ActionSource, NodeExecution
from manipulation_policy.nodes.node_inputs import NodeInputs
from manipulation_policy.nodes.node_publishing import NodePublishing
from manipulation_policy.nodes.node_safety import NodeSafety
from manipulation_policy.nodes.parameter_handling import NodeParameters
from manipulation_policy.robot.camera_inputs import StateLayout, configuration_problem
from manipulation_policy.robot.node_parameters import ParameterSpec
from manipulation_policy.robot.scheduling import task_active_at_start

__all__ = ["ActionSource", "PolicyNodeBase", "run_node"]


class ConfigureFailed(Exception):
    """The action source cannot be made (no weights, no server): the reason, in one line."""


class PolicyNodeBase(
    NodeParameters, NodeInputs, NodeExecution, NodeSafety, NodePublishing, LifecycleNode
):
    """The shared node; subclasses supply the action source through two hooks.

    - ``create_action_source()``: called at each configure; raises (ConfigureFailed,
      ValueError, OSError...) with a reason when it cannot be made.
    - ``parameters_changed(changed)``: called after live parameters were accepted.
    """

    # remote_policy_node sets this: upstream's use_remote:=true then means "this node".
    remote = False
    # Seconds between configure attempts under autostart after a failed one (None: no
    # retry: missing weights do not come back by themselves; a server may).
    AUTOSTART_RETRY_SEC: Optional[float] = None

    def __init__(self, node_name: str, extra_parameters: Sequence[ParameterSpec], **node_kwargs):
        super().__init__(node_name, **node_kwargs)
        self._ready = False
        self._closing = False
        self.lifecycle_state = "unconfigured"
        self.action_source: Optional[ActionSource] = None
        self._worker = None
        self._autostart_timer = None
        self.configure_problem: Optional[str] = None
        # Why the newest inputs could not go (a camera of the set, the state), if so.
        self.inputs_problem: Optional[str] = None
        # Guards the inputs' latest messages and the counters.
        self._state_lock = threading.Lock()
        self._counters = {
            "images": 0,
            "incomplete_inputs": 0,
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
            "stop_holds": 0,
            "held_by_stop": 0,
            "answers_after_stop": 0,
        }
        self._init_scheduling()
        self._init_inputs()
        upstream = self._declare_parameters(extra_parameters)
        values = self.parameter_values()
        if task_active_at_start(values["wait_for_task"], upstream.task_given):
            self._scheduler.start_task()
        self._init_executor(values)
        self._init_publishing()
        self._init_safety(values)

        self._subscribe_to_inputs(values)
        self._create_publishers(values)
        self._start_diagnostics()
        self._ready = True
        if values["autostart"]:
            self._autostart()
        else:
            self.get_logger().info(
                "autostart is false: unconfigured until `ros2 lifecycle set "
                f"{self.get_fully_qualified_name()} configure` (or a lifecycle manager)"
            )

    # ------------------------------------------------------------ lifecycle

    def _autostart(self) -> None:
        """configure, then activate; under AUTOSTART_RETRY_SEC, again until configured."""
        if self.lifecycle_state != "unconfigured":
            self._stop_autostart_retry()
            return
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self._stop_autostart_retry()
            self.trigger_activate()
        elif self.AUTOSTART_RETRY_SEC is not None and self._autostart_timer is None:
            self.get_logger().info(
                f"autostart: trying to configure again every {self.AUTOSTART_RETRY_SEC:g} s"
            )
            self._autostart_timer = self.create_timer(self.AUTOSTART_RETRY_SEC, self._autostart)

    def _stop_autostart_retry(self) -> None:
        if self._autostart_timer is not None:
            self.destroy_timer(self._autostart_timer)
            self._autostart_timer = None

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.action_source = self.create_action_source()
        except Exception as exc:  # noqa: BLE001 - any reason leaves the node unconfigured
            self.configure_problem = failure_reason(exc)
            self.get_logger().error(f"configure failed: {self.configure_problem}")
            self.action_source = None
            return TransitionCallbackReturn.FAILURE
        self.configure_problem = None
        self._start_worker()
        self.lifecycle_state = "inactive"
        values = self.parameter_values()
        self.get_logger().info(
            f"configured: listening to {self._camera_topic}"
            + ("" if self._cameras else f" ({values['image_transport']})")
            + (f" and {self._observation_topic} (aggregated observation)"
               if values["use_observation"] else "")
            + f"; tasks on {self._task_topic}; e-stop on {self._estop_topic}"
        )
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        values = self.parameter_values()
        self._executor.clear()
        self._watchdog.arm()
        self._estop_gate.arm()
        with self._publish_lock:
            self._publishing = True
        self._start_timers(values)
        self.lifecycle_state = "active"
        destination = (
            f"dry run: commands go to {values['preview_topic']}, nothing to "
            f"{values['output_topic']}" if values["dry_run"]
            else f"commands go to {values['output_topic']}"
        )
        self.get_logger().info(
            f"active: {destination}, at up to {values['inference_rate']:g} Hz"
            + (f"; EMERGENCY STOP engaged on {self._estop_topic}"
               if self._stops.estop_engaged else "")
        )
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stand_down()
        self.lifecycle_state = "inactive"
        self.get_logger().info("inactive: one hold published, no more commands")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.lifecycle_state = "unconfigured"
        self.get_logger().info("cleaned up: action source released")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_autostart_retry()
        if self._publishing:
            self._stand_down()
        self._release()
        self.lifecycle_state = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stand_down()
        self._release()
        self.lifecycle_state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def _stand_down(self) -> None:
        """Stop the timers and the planned steps; one hold, then nothing goes out."""
        self._stop_timers()
        self._executor.clear()
        self._guard.reset()
        with self._publish_lock:
            if self._publishing:
                self._publish_hold_now()
            self._publishing = False
        self._watchdog.disarm()
        self._stops.clear_input_problem()

    def _release(self) -> None:
        """The action source (model, connections) and the worker go."""
        if self.action_source is not None:
            self.close_action_source()
        self._stop_worker()
        self.action_source = None
        self._executor.clear()

    # ------------------------------------------------------------ hooks

    def create_action_source(self) -> ActionSource:
        raise NotImplementedError

    def check_policy_inputs(self, required: Optional[PolicyInputs]) -> None:
        """ConfigureFailed, one line naming the camera or the state length, when what the
        policy reads (None: it does not say) does not fit camera_names and the state
        layout (state_joints, state_eef_pose)."""
        if required is None:
            return
        values = self.parameter_values()
        problem = configuration_problem(
            required, values["camera_names"], StateLayout.from_values(values)
        )
        if problem is not None:
            raise ConfigureFailed(problem)

    def parameters_changed(self, changed: dict[str, Any]) -> None:
        """Live parameters in ``changed`` were just accepted (values already current)."""

    # ------------------------------------------------------------ across the parts

    def _react_to(self, changes: dict[str, Any]) -> None:
        """What accepted live parameter changes set in motion (values already current)."""
        self._execution_parameters_changed(changes)
        if "dry_run" in changes:
            self._dry_run_changed(changes["dry_run"])
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
        if hasattr(self, "_executor"):  # construction got that far
            self._stop_autostart_retry()
            self._stop_timers()
            with self._publish_lock:
                self._publishing = False
            self._release()
        super().destroy_node()


def failure_reason(exc: BaseException) -> str:
    """Why a configure failed, in one printable line: a ConfigureFailed's own words, else
    the exception's type and the first line of its message (as the server's start says)."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if not isinstance(exc, ConfigureFailed):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if text.isprintable() else ascii(text)[1:-1]


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
