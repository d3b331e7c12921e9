"""The machine the job runs on, checked at start: the NVIDIA driver against the image's CUDA runtime
(`driver`), and how fast scratch takes a checkpoint (`scratch_speed`). Below durability in the layers:
these modules know errors, logs and config only."""
