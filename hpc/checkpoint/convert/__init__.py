"""Checkpoint conversion: any committed step to any world size and strategy, and to and from
Hugging Face (`tools/ckpt_convert`, and the job itself when it resumes a step it cannot load as saved).

    neutral      the shape every format is read into and written from: named whole tensors + StepState
    dcp          DDP/FSDP steps (torch.distributed.checkpoint): DcpReader, DcpWriter
    zero         DeepSpeed ZeRO-1/2/3 steps at any world size: ZeroReader, ZeroWriter (zero_layout:
                 the partition arithmetic; torchfile: torch.save's format written in pieces)
    hf           Hugging Face Llama folders: export_hf, HfReader, checkpoint.init_from (hf_layout:
                 names, the rotary row permutation, config.json)
    steps        a source step opened and verified; the Target a conversion produces
    pipeline     one tensor at a time from a Reader into a Writer's parts (workers), commit, reshard()
    imports      an HF folder as a committed step 0
    verify       two checkpoints of any formats compared tensor by tensor
    inspect      what a step holds, from metadata only
    resume       when a job converts on resume, and where the converted copy lives
    __main__     the command line (tools/ckpt_convert)
"""
