"""Repeat-step bit check of an eager decode step (session 12 dec's grad-mode observation)."""
import sys
tree, mode = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree)
import torch
import mamba_pkg
from mamba_pkg.generation import decode as dec
from mamba_pkg.models.config import MambaConfig
from mamba_pkg.models.lm import MambaLMHeadModel
from mamba_pkg.ops import decode_linear as dl
VOCAB = 37
KIND = {"mamba2": dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8}), "mamba1": dict(ssm_cfg={"layer": "Mamba1", "d_state": 4})}
print(tree, mamba_pkg.__file__, mode, flush=True)
for kind in ("mamba2", "mamba1"):
    for batch in (64, 1):
        torch.manual_seed(1)
        try:
            config = MambaConfig(d_model=768, n_layer=2, vocab_size=VOCAB, **KIND[kind])
        except TypeError:
            continue
        model = MambaLMHeadModel(config, device="cuda", dtype=torch.bfloat16).eval()
        with torch.no_grad():
            model.backbone.embedding.weight.mul_(20)
        params = dec._new_cache(model, batch, 16, torch.bfloat16)
        params.lengths_per_sample = torch.full((batch,), 5, dtype=torch.int32, device="cuda")
        params.seqlen_offset = 5
        states = [t for entry in params.key_value_memory_dict.values() for t in entry]
        torch.manual_seed(2)
        for t in states:
            t.normal_()
        start = [t.clone() for t in states]
        tokens = torch.randint(0, VOCAB, (batch,), device="cuda")
        outs = []
        ctx = torch.no_grad() if mode == "nograd" else torch.enable_grad()
        with ctx:
            for _ in range(8):
                for t, t0 in zip(states, start):
                    t.copy_(t0)
                outs.append(dec._step_eager(model, tokens, params, VOCAB).float().clone())
        torch.cuda.synchronize()
        diffs = [float((o - outs[1]).abs().max()) for o in outs[1:]]
        print(kind, batch, mode, "max |step k - step 1|:", diffs, flush=True)
