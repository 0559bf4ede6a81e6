"""`policy_node`: the policy runs inside this process (robot-side GPU).

The backend (OpenVLA by default, ``backend:=stub`` for the deterministic
stub) is loaded once at start; inference runs on the base class's worker
thread. The backend's answer is an action chunk (``backends.predictor``); the
base class's executor publishes each of its actions when it is due (a
single-step model's one action at once, as before chunks existed).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from manipulation_policy.backends import (
    PolicyBackend,
    backend_inputs,
    create_backend,
    is_plugin,
    predictor,
)
from manipulation_policy.nodes.policy_node_base import ActionSource, PolicyNodeBase, run_node
from manipulation_policy.robot.node_parameters import (
    POLICY_NODE_PARAMETERS,
    parameter_backend_arguments,
    policy_node_parameters,
)


class PolicyNode(PolicyNodeBase):
    def __init__(self, backend: Optional[PolicyBackend] = None, **node_kwargs: Any):
        """``backend``: an already built backend to use instead of the ``backend`` parameter."""
        self._given_backend = backend
        super().__init__("policy_node", POLICY_NODE_PARAMETERS, **node_kwargs)

    def create_action_source(self) -> ActionSource:
        backend = self._given_backend
        if backend is None:
            values = self.parameter_values()
            if is_plugin(values["backend"]):  # a plugin's own options are parameters too
                self.declare_start_parameters(policy_node_parameters(values["backend"]))
                values = self.parameter_values()
            self.get_logger().info(f"loading backend {values['backend']!r}")
            backend = create_backend(values["backend"], **parameter_backend_arguments(values))
        self.backend = backend
        try:
            self.check_policy_inputs(backend_inputs(backend))
        except Exception:
            if self._given_backend is None:
                self.close_action_source()  # no model stays loaded for a refused configure
            raise
        self.get_logger().info(f"backend ready: {backend.describe()}")
        return predictor(backend)

    def close_action_source(self) -> None:
        """Release the model (cleanup, shutdown): the backend's close(), where it has one,
        and no reference left here."""
        backend, self.backend = getattr(self, "backend", None), None
        close = getattr(backend, "close", None)
        if callable(close):
            close()


def main(args: Optional[list[str]] = None) -> int:
    return run_node(PolicyNode, args)


if __name__ == "__main__":
    sys.exit(main())
