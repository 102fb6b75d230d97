"""Expert parallelism: routed experts sharded over the ranks of an EP group, tokens dispatched to
them and combined back with all-to-alls.

    expert_placement which rank and node holds which expert (one place, from the topology)
    dispatch         AllToAllDispatch: the MoE layer's routed part over an EP group, each (token,
                     rank) pair sent once, dropless; and the collectives it makes, inside autograd:
                     count exchange, token all-to-all (FP8 or the compute dtype), their reverses in
                     backward, and the asynchronous form the overlapped phases launch
    routing_stats    distinct ranks and nodes each token is sent to, per step
    install          build-time: replace each MoE layer's experts by this rank's slice, install the
                     dispatch

The model code stays single-device (`model.transformer.MoE` calls `self.dispatch` and `self.experts`); this
room swaps both, as `platform.precision.apply_precision` swaps GEMM modules.
"""
