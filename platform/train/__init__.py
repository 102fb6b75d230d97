"""The training run: the one outer loop (`trainer.Trainer`) and its one-process step engine
(`single.SingleProcessEngine`, `parallel.schedule=single`, the numerical reference every parallel
layout is tested against); `pipeline` runs the Trainer over one pipeline rank's engine (what each
Ray Train worker runs).
"""
