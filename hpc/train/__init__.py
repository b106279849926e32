"""In-allocation training: model, data (resumable), strategies/ (one engine per file), the loop, its
RNG streams (rng.py), metrics and optimizer. torch is imported here, never on the login node."""
