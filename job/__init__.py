"""sft-job: a preemptible, full-parameter SFT batch job for one 96 GB GPU."""

__version__ = "0.1.0"
