"""Start the MobileManipulationCore policy stack: exactly one policy node.

    ros2 launch manipulation_bringup core_launch.py                 # model in-process
    ros2 launch manipulation_bringup core_launch.py use_remote_policy:=true \\
        remote_url:=http://gpu-host:5000                            # model on a GPU host

The node gets params_file as it is (its /<node>, /<namespace>/<node> and
wildcard sections apply as rcl applies them); launch arguments that are set
override it. Which node starts, with which parameters, and whether a value is
valid is decided by manipulation_bringup.launch_logic (plain Python with its
own tests).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from manipulation_bringup import launch_logic


def _start_policy_node(context):
    arguments = {
        name: LaunchConfiguration(name).perform(context)
        for name in launch_logic.LAUNCH_ARGUMENT_NAMES
    }
    # A module.path:ClassName backend's own options: launch arguments given on the
    # command line, not declared above (they are known only once backend is).
    arguments.update(
        launch_logic.plugin_arguments(arguments.get("backend", ""), context.launch_configurations)
    )
    plan = launch_logic.plan_policy_node(
        arguments, outer_namespace=context.launch_configurations.get("ros_namespace", "") or ""
    )
    actions = [LogInfo(msg=plan.summary())]
    actions.extend(LogInfo(msg=f"warning: {warning}") for warning in plan.warnings)
    if plan.ignored_arguments:
        actions.append(
            LogInfo(msg=f"{plan.name} does not use: {', '.join(plan.ignored_arguments)}")
        )
    actions.append(
        Node(
            package=plan.package,
            executable=plan.executable,
            name=plan.name,
            namespace=plan.namespace or None,
            parameters=plan.launch_parameters(),
            output="screen",
            emulate_tty=True,
        )
    )
    return actions


def generate_launch_description():
    default_params_file = os.path.join(
        get_package_share_directory("manipulation_bringup"), "config", "policy_params.yaml"
    )
    declarations = [
        DeclareLaunchArgument(
            argument.name,
            default_value=default_params_file
            if argument.name == "params_file"
            else argument.default,
            description=argument.description,
        )
        for argument in launch_logic.LAUNCH_ARGUMENTS
    ]
    return LaunchDescription([*declarations, OpaqueFunction(function=_start_policy_node)])
