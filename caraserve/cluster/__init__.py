"""Cluster-level serving: the batch latency model, routing policies and a discrete-event simulator.

Nothing here imports torch or the engine: the latency model sits below both the engine's
scheduler and the cluster policies, and the simulator must run anywhere in seconds.
"""
