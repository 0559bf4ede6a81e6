"""Another node's parameters through its real parameter services, as `ros2 param` reaches them.

Every rclpy node serves ``<node>/get_parameters``, ``set_parameters``,
``set_parameters_atomically`` and ``describe_parameters`` (rcl_interfaces).
``rclpy.parameter_client.AsyncParameterClient`` wraps them, but it is newer than
ROS 2 Humble, so the tests call the services themselves, with APIs Humble has.
Each call returns the service's future; the caller's executor completes it.
"""

from __future__ import annotations

from collections.abc import Iterable

from rcl_interfaces.srv import (
    DescribeParameters,
    GetParameters,
    SetParameters,
    SetParametersAtomically,
)
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.task import Future


class ParameterServices:
    def __init__(self, node: Node, node_fqn: str) -> None:
        def client(service_type, name: str):
            return node.create_client(service_type, f"{node_fqn}/{name}")

        self._get = client(GetParameters, "get_parameters")
        self._set = client(SetParameters, "set_parameters")
        self._set_atomically = client(SetParametersAtomically, "set_parameters_atomically")
        self._describe = client(DescribeParameters, "describe_parameters")
        self._clients = (self._get, self._set, self._set_atomically, self._describe)

    def services_are_ready(self) -> bool:
        return all(c.service_is_ready() for c in self._clients)

    def wait_for_services(self, timeout_sec: float) -> bool:
        return all(c.wait_for_service(timeout_sec=timeout_sec) for c in self._clients)

    def get_parameters(self, names: Iterable[str]) -> Future:
        return self._get.call_async(GetParameters.Request(names=list(names)))

    def set_parameters(self, parameters: Iterable[Parameter]) -> Future:
        request = SetParameters.Request(parameters=[p.to_parameter_msg() for p in parameters])
        return self._set.call_async(request)

    def set_parameters_atomically(self, parameters: Iterable[Parameter]) -> Future:
        request = SetParametersAtomically.Request(
            parameters=[p.to_parameter_msg() for p in parameters]
        )
        return self._set_atomically.call_async(request)

    def describe_parameters(self, names: Iterable[str]) -> Future:
        return self._describe.call_async(DescribeParameters.Request(names=list(names)))
