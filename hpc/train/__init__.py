"""In-allocation training: data, model, loop (torch is imported here, never on the login node)."""
