"""Sharded checkpoints: staged on node-local scratch, drained to persistent storage, committed by a
manifest written last, resumed from the newest step that verifies.

    checkpointer  the pipeline the trainer calls: save, drain, commit, retention
    restore       which step to resume, a verified copy on every node, loading it
    formats       engine state <-> files: DCP (DDP, FSDP) or DeepSpeed's own
    manifest      the commit protocol and discovery of committed steps
    drain         upload, staging a step for resume, retention
    storage       persistent storage: a path (os) or an fsspec URL
    space         will it fit? checked before training starts

Submodules are imported where used: the storage and manifest parts need no torch.
"""
