"""Cluster-level serving: routing policies, a discrete-event simulator and its workloads.

Nothing here imports torch, the engine or the servers: the policies price a replica with the
latency model below (caraserve.perf) from its typed state (caraserve.state), and the simulator
must run anywhere in seconds.
"""
