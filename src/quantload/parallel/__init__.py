"""Tensor-parallel loading (issue #14): each torch.distributed rank loads only its shard of every weight,
still quantized (shard_specs.py), into a model whose split Linears all-reduce where transformers' plan
says so (load.py). docs/parallel.md."""
