"""Inside the allocation, before any training: who this rank is and how it meets the others.

    environment  JobEnv: rank, local rank, nodes, restart count, from srun / submitit / torchrun
    network      gloo's interface: the one that routes to the rendezvous address (never loopback
                 on several nodes), unless the config or the environment names one
    rendezvous   rendezvous address and port (with fallbacks), backend, this rank's GPU, joining
    preflight    every rank's host, device, CPUs, gloo address and scratch, then one all-reduce
    extensions   where DeepSpeed JIT-builds its ops (node-local), and stale build locks removed
"""
