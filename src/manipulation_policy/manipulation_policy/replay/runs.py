"""A run to compare, from this replay's outputs or from a bag: the PolicyOutputs on the
output topic, and the requests' latencies and failures where the bag says them (a
replay's bag, on ``REQUESTS_TOPIC``). For a recording of a live node, the latency of a
decision is the time from its observation's stamp to its first command's publication
(the bag's log time), and failures are not known."""

from __future__ import annotations

import json
from typing import Any

from rosbags.typesys.store import Typestore

from manipulation_policy.replay.bag_input import RecordedBag
from manipulation_policy.replay.bag_output import REQUESTS_TOPIC, STRING
from manipulation_policy.replay.bag_types import POLICY_OUTPUT
from manipulation_policy.replay.comparison import Run, Step
from manipulation_policy.replay.errors import ReplayInputError
from manipulation_policy.replay.simulated_node import Outputs
from manipulation_policy.robot import message_reading as read


def run_from_outputs(name: str, outputs: Outputs) -> Run:
    return Run(
        name,
        [Step(c.stamp_ns, c.step_index, c.action,
              c.fields["due"]["sec"] * read.NANOSECONDS + c.fields["due"]["nanosec"])
         for c in outputs.commands],
        [r.latency_ms for r in outputs.requests if not r.failure],
        sum(1 for r in outputs.requests if r.failure),
    )


class RunRecorder:
    """Builds a Run from a bag's PolicyOutputs (and a replay's request records)."""

    def __init__(self, name: str, with_requests: bool):
        self.run = Run(name, failures=0 if with_requests else None)
        self._with_requests = with_requests

    def output(self, time_ns: int, msg: Any) -> None:
        stamp_ns = read.stamp_to_nanoseconds(msg.header.stamp)
        self.run.steps.append(Step(stamp_ns, int(msg.step_index), read.policy_output_to_action(msg),
                                   read.stamp_to_nanoseconds(msg.due)))
        if not self._with_requests and msg.step_index == 0:
            self.run.latencies_ms.append((time_ns - stamp_ns) / 1e6)

    def request(self, msg: Any) -> None:
        request = json.loads(msg.data)
        if request["failure"]:
            self.run.failures += 1
        else:
            self.run.latencies_ms.append(float(request["latency_ms"]))


def run_from_bag(path: str, store: Typestore, output_topic: str, name: str = "") -> Run:
    with RecordedBag(path, store) as bag:
        present = bag.topics()
        if output_topic not in present:
            raise ReplayInputError(f"{path}: no {output_topic} to compare with")
        if present[output_topic] != POLICY_OUTPUT:
            raise ReplayInputError(f"{path}: {output_topic} is {present[output_topic]}, "
                                   f"not {POLICY_OUTPUT}")
        kinds = {output_topic: "output"}
        with_requests = present.get(REQUESTS_TOPIC) == STRING
        if with_requests:
            kinds[REQUESTS_TOPIC] = "request"
        recorder = RunRecorder(name or str(path), with_requests)
        for kind, time_ns, msg in bag.messages(kinds):
            if kind == "request":
                recorder.request(msg)
            else:
                recorder.output(time_ns, msg)
        return recorder.run
