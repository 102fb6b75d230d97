"""Inference: cached decoding over the MLA latent cache, sampling, MTP speculative decoding.

`generate` (generate.py) is the entry point; sampling.py holds the pure logits -> token functions and
speculative.py the MTP drafting state and the speculative acceptance rule.
"""
