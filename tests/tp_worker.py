"""One rank of a tensor-parallel test (tests/test_tp.py starts N of these on 127.0.0.1 with gloo).

    python tp_worker.py CKPT[,CKPT...] WORLD RANK STORE_FILE OUT.json MODE
MODE "load": load each checkpoint with tp_plan="auto", record logits, greedy tokens, bytes read; rank 0
also loads it in one process and records its logits and tokens (several checkpoints a run: the
interpreter and transformers start once). MODE "bad": a sequence of bad
requests, each of which must raise a QuantloadError on this rank (recorded), with no hang.
"""
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import quantload
from transformers import LlamaForCausalLM  # noqa: F401  (imported before the timed loads: ~5-15 s here)

ckpt, world, rank, port, out, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], \
    sys.argv[6]
torch.set_num_threads(1)
# PORT is a rendezvous file (file:// store: no free-port race with the machine's other processes); gloo
# itself connects over 127.0.0.1. The timeout bounds every collective (a busy 2-core machine: generous).
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
dist.init_process_group("gloo", init_method=f"file://{port}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=120))
from quantload.sources.safetensors import SafetensorsSource  # noqa: E402

gets = {"n": 0}
_get = SafetensorsSource.get


def counting_get(self, key):
    gets["n"] += 1
    if gets.get("fail_here"):
        raise quantload.FileFormatError("injected read failure", file=self.path, key=key)
    return _get(self, key)


SafetensorsSource.get = counting_get   # how many tensors a request touched (a bad one: none)
ids = torch.tensor([[3, 17, 42, 99, 5, 250, 7, 64]])
result = {"rank": rank}
try:
    if mode == "load":
        for path in ckpt.split(","):
            result[path] = r = {}
            t = time.perf_counter()
            plan = json.loads(os.environ.get("TP_PLAN", '"auto"'))
            exact = os.environ.get("TP_EXACT", "1") == "1"
            model = quantload.load(path, tp_plan=plan, dtype=torch.float32, exact=exact, progress=False)
            r["load_s"] = time.perf_counter() - t
            with torch.no_grad():
                logits = model(ids).logits
                tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
            r["logits"] = logits.flatten().tolist()
            r["tokens"] = tokens.flatten().tolist()
            r["parallel"] = dict(model.load_report.parallel)
            r["kernels"] = sorted({str(k.kernel) for k in model.load_report.kernels.values()})
            del model
            dist.barrier()
            if rank == 0:
                ref = quantload.load(path, dtype=torch.float32, exact=exact, progress=False)
                with torch.no_grad():
                    r["ref_logits"] = ref(ids).logits.flatten().tolist()
                    r["ref_tokens"] = ref.generate(ids, max_new_tokens=6, do_sample=False).flatten().tolist()
    else:
        errors = []
        for plan in ("auto", {"model.layers.*.self_attn.nonexistent": "colwise"},
                     {"model.layers.*.mlp.up_proj": "diagonal"}):
            t = time.perf_counter()
            try:
                gets["n"] = 0
                quantload.load(ckpt, tp_plan=plan, dtype=torch.float32, progress=False)
                errors.append({"plan": str(plan), "error": None})
            except quantload.QuantloadError as e:
                errors.append({"plan": str(plan), "type": type(e).__name__, "error": str(e),
                               "s": time.perf_counter() - t, "tensors_read": gets["n"]})
        # a load that fails on rank 1 only (a read error): rank 0 must raise too, not wait in a forward
        gets["fail_here"] = rank == 1
        try:
            quantload.load(ckpt, tp_plan={"model.layers.*.mlp.up_proj": "colwise"}, progress=False)
            errors.append({"plan": "one rank fails", "error": None})
        except quantload.QuantloadError as e:
            errors.append({"plan": "one rank fails", "type": type(e).__name__, "error": str(e)})
        gets["fail_here"] = False
        result["errors"] = errors
finally:
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
