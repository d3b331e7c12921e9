"""Training: the fast-path decision for this GPU, TRL's SFTConfig and SFTTrainer built from the job's
config, and the callbacks that record steps and save checkpoints."""
