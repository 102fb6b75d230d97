"""The single-process training loop (`parallel.schedule=single`): a complete run, and the numerical
reference every parallel layout is tested against.
"""
