"""Checkpoints: the writer and reader (`store`: safetensors shards, JSON manifest, COMPLETE marker,
pruning), the checkpointable state of each part (`state`: optimizer by parameter name, RNG), and the
one resume rule both training loops follow (`resume`).
"""
