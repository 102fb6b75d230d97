"""What a run leaves behind and shows: storage (local or s3://), the run's files (config.yaml,
metrics.jsonl, summary.json), step metrics and progress lines, tracking (W&B), the pipeline
timeline and loss plots, and rank 0's report of a pipeline run.
"""
