"""MobileManipulationCore policy package: VLA backends, wire contract, ROS nodes, HTTP server."""

__version__ = "0.1.0"
