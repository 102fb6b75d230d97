"""One pipeline rank's machinery: where each rank sits and which ranks talk (`topology`), the
model's stages (`stages`), their forward and split backward (`stage_compute`, `chunk_program`), the
schedule executor (`executor`) over point-to-point transfers (`p2p`), the step's clock, the rank's
training state and optimizer step (`rank_engine.RankEngine`), and the record of what a rank posts,
held to NCCL's rules (`comm_record`, `nccl_rules`).
"""
