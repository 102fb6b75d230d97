"""The optimizer step: AdamW construction (`adamw`, the one constructor), the LR schedule, the
pipeline rank's step with ZeRO (`zero_step`, DeepSpeed) or without (`plain_step`), and the
auxiliary-loss-free router-bias update (`bias_update`).
"""
