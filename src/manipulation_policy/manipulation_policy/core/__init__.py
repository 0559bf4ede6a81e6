"""The shared core: plain types, the wire contract, imaging, pose and action math,
option definitions. No ROS, no HTTP framework, no torch.
"""
