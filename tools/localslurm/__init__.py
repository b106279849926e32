"""The local SLURM test cluster behind tools/slurm_cluster.py (see that file's docstring for what
runs, the state folder layout and why).  Modules, in import order: paths (names, constants, the
state folder layout), processes (PID checks, running and stopping), install (apt packages), conf
(the config files' text, pure), statedir (ports, first job id, writing the state folder), health
(checks and the status table), start (starting each daemon), cli (the commands and main).
"""
