"""`python -m job ...`: what the launcher runs on every rank (the same CLI as entrypoint.py)."""

from job.cli import main

main()
