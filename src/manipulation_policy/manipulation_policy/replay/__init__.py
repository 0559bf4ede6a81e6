"""Replay of recorded episodes: ``python3 -m manipulation_policy.replay BAG ...`` (cli.py).

bag_types (message types without ROS), bag_input (reading a recording), node_settings
(the node's parameters), action_sources (in-process backend or policy server),
simulated_node (the node's decisions in simulated time), bag_output (the MCAP bag of
commands), runs / comparison / report / plot (the per-step comparison).
"""
