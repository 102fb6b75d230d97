"""One pipeline rank's machinery: where each rank sits and which ranks talk (`topology`), the
model's stages and their forward and split backward (`stages`, `chunk_program`), the
schedule executor (`executor`) over point-to-point transfers (`p2p`), the step's clock, building a
rank (`rank_build.assemble_rank`), its step engine (`rank_engine.RankEngine`) and checkpoint I/O
(`rank_checkpoint`), and the record of what a rank posts, held to NCCL's rules (`comm_record`,
`nccl_rules`).
"""
