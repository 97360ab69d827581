"""deepfuse runtime: kernel units, launchers, autotuning and the ``deepfuse::`` custom ops."""
