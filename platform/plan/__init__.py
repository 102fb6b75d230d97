"""The estimator's arithmetic (`moeforge-estimate`): parameters, FLOPs and the run's cost
(`accounting`), the per-rank memory plan, and the network plan over a cluster's fabric.
"""
