"""Before any weights load: the memory and time plan for the GPU from config.json alone, and the
FLOPs per token behind MFU."""
