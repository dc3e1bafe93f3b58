"""The batch latency model (decode and prefill step time from a batch's shape) and its fit.

Below the engine and the cluster code alike: the scheduler's SLO admission, the routing policies,
the Ray router and the simulator all price a batch with it. Nothing here imports torch."""
