"""Robot-side logic that needs no ROS: the nodes' parameters, input selection and
scheduling, the action-chunk executor, and the remote node's HTTP client and its
answer checks.

Both nodes run this same code; ``nodes/`` keeps only what touches rclpy.
"""
