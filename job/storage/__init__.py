"""Where a run lives: one `Store` interface over local disk and S3-compatible object stores, with
manifests (sha256 of every file, written last) as the commit point of every durable prefix."""
