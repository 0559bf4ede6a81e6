"""What runs on the robot: the two ROS 2 nodes, their parameters and scheduling
(ROS-free where it can be), the ROS conversions and the remote node's HTTP client.
"""
