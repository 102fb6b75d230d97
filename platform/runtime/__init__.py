"""The distributed runtime: the one Ray connection of every job (`ray_connection`), launching on Ray
(`launch`, `worker`), whether the cluster fits, the topology and process groups, splitting the model
into stages, the per-rank training state (`rank_state`) and the whole run on a rank
(`pipeline_run`), the schedule executor, point-to-point transfers, and gloo processes spawned
without Ray for tests and benchmarks (`local_spawn`).
"""
