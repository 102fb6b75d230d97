"""Getting a run onto machines: the one Ray connection of every job (`ray_connection`), the Ray
Train launch of a pipeline run and its worker loop (`ray_train`), whether the cluster can
host the run and waiting until it can, which world rank runs on which node (`rank_placement_plan`,
`rank_placement`), each worker's device (`accelerator`), gloo processes without Ray for tests and
benchmarks (`local_spawn`), and setup's choice of Python and torch (`torch_install`).
"""
