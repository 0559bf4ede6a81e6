"""Robot-side logic that needs no ROS: the action-chunk executor and its settings.

Both nodes run this same code; ``nodes/`` keeps only what touches rclpy.
"""
