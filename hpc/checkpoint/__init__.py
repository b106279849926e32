"""Sharded checkpoints: staged on node-local scratch, drained to persistent storage, committed by a
manifest written last, resumed from the newest step that verifies.

    checkpointer  the facade the trainer calls (the loop's Checkpoints protocol), composed of:
    collectives     gather / broadcast / barrier / raise-together over its own gloo group
    restorer        which step to resume, a verified copy on every node, loading it
    saver           write on scratch, upload in the background, commit, retention
    cadence         when a save is due: every_steps, a fixed or an automatic (Young/Daly) clock
    formats       engine state <-> files: DCP (DDP, FSDP) or DeepSpeed's own
    staging       what a rank stages for a DCP save (its share only) and the one flat host buffer
    manifest      the commit protocol and discovery of committed steps
    transfer      upload after a save, staging before a resume, retries with backoff
    retention     which step folders go once a newer step commits
    storage       persistent storage: a path (os) or an fsspec URL
    space         will it fit? checked before training starts
    convert/      any step to any world size and strategy, and to/from Hugging Face: one reader and
                  writer per format over a neutral shape (tools/ckpt_convert; the restorer converts
                  a step it cannot load as saved)

Submodules are imported where used: the storage and manifest parts need no torch.
"""
