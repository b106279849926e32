"""Inside the allocation: job environment, rendezvous, preflight, the entry point."""
