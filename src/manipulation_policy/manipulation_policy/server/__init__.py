"""The policy server: the HTTP app, admission, batching, the model thread, metrics,
auth and its process helper. Started by ``python3 -m manipulation_policy.policy_server``.
"""
