"""Distributed serving: one model sharded over several processes or hosts with mlx.distributed.

Rank 0 is the server (HTTP, scheduler, executor); every other rank runs `worker.run`, which
loads its part of the model and repeats rank 0's executor steps in lockstep. See `launch`
(who is which rank; a local launcher), `plan` (what each step does), `control` (the side
connection that carries the plans and notices a dead rank), `shard` (tensor and pipeline
splits), `group` (the MLX collectives), `rank0` and `worker`.

Nothing here is imported unless the process was launched as several ranks.
"""
