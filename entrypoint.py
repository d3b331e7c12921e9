#!/usr/bin/env python3
"""Container entrypoint: everything lives in `job.cli`."""

from job.cli import main

if __name__ == "__main__":
    main()
