"""What runs on the robot and touches rclpy: the two ROS 2 nodes, their shared base,
parameter declaration and the ROS conversions. The logic they run that needs no
ROS lives in ``manipulation_policy.robot``.
"""
