"""What survives a preemption: committed checkpoints and their background upload, the one-writer
lease, SIGTERM handling within the grace budget, and test-only fault injection."""
