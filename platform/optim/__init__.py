"""The optimizer step: AdamW construction (`adamw`, the one constructor), the LR schedule, the
pipeline rank's step with ZeRO (`zero_step`, DeepSpeed) or without (`plain_step`), the
auxiliary-loss-free router-bias update (`bias_update`), and the recipe schedules of the bias update
speed and the MTP loss weight (`recipe_schedule`).
"""
