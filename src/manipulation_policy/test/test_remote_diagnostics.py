"""The remote node's server-link diagnostic: level and message follow the link's state."""

import pytest
from diagnostic_msgs.msg import DiagnosticStatus

from manipulation_policy.nodes.remote_diagnostics import ServerLinkState, server_link_status
from manipulation_policy.robot.remote_client import BreakerState


@pytest.mark.parametrize(
    ("breaker", "failing", "level", "message"),
    [
        (BreakerState.CLOSED, False, DiagnosticStatus.OK, "policy server answering"),
        (BreakerState.CLOSED, True, DiagnosticStatus.WARN, "decisions failing: timed out"),
        (BreakerState.HALF_OPEN, True, DiagnosticStatus.WARN, "decisions failing: timed out"),
        (BreakerState.OPEN, True, DiagnosticStatus.ERROR, "circuit breaker open: timed out"),
    ],
)
def test_level_and_message_follow_the_link(breaker, failing, level, message):
    failure = "timed out" if failing else ""
    state = ServerLinkState("http://gpu:5000", breaker, failing, 0.5, failure)
    status = server_link_status("/robot1/remote_policy_node", state)
    assert (status.level, status.message) == (level, message)
    assert status.name == "/robot1/remote_policy_node: policy server"
    assert status.hardware_id == "http://gpu:5000"
    values = {pair.key: pair.value for pair in status.values}
    assert values["breaker"] == breaker.value and values["failing"] == str(failing).lower()
