"""Transaction-aware mail delivery with a durable Maildir queue."""
