"""Test-wide settings shared by every package's tests.

DDS stays on loopback, and each pytest process gets its own ROS domain so
that concurrent test runs (or a demo running beside them) never cross-talk.
Set before any test imports rclpy, which reads them at rclpy.init().
"""

import os

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(100 + os.getpid() % 100)
