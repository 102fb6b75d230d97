"""Inference: cached decoding over the MLA latent cache, sampling, MTP speculative decoding.

`generate.generate` is the entry point; `sampling` holds the pure logits -> token functions and
`speculative` the MTP drafting state (`speculative.MTPDrafter`) and the speculative acceptance rule.
"""
