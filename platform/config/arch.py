"""The `arch` tag of a model YAML (conf/model/*.yaml): which config class its values build.

moeforge-train trains the DeepSeek-V3 family; moeforge-estimate also reads dense GQA baselines for
comparison; `from_checkpoint` takes the model of `init.from`.
"""

ARCH_DEEPSEEK_V3 = "deepseek_v3"
ARCH_DENSE_GQA = "dense_gqa"
ARCH_FROM_CHECKPOINT = "from_checkpoint"  # conf/model/from_checkpoint.yaml
