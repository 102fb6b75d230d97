"""The training runs: the single-process loop (`single.ReferenceTrainer`, `parallel.schedule=single`,
the numerical reference every parallel layout is tested against) and the whole run of one pipeline
rank (`pipeline`, what each Ray Train worker runs around its steps).
"""
