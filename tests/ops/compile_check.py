"""Shared check of the ops' torch.compile tests: one graph (fullgraph) equals eager."""

import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs


def compiled_matches_eager(step, leaves, *, rtol=1e-5, atol=1e-5):
    """Run ``step`` eagerly and compiled (fullgraph=True, aot_eager) on fresh leaf copies of
    ``leaves`` (a list: positional, or a dict: keyword arguments) and assert that the loss it
    returns and the gradient of every leaf agree. Returns the code of the recorded forward and
    backward graphs, to check which custom ops they hold."""
    results = []
    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    try:
        for fn in (step, torch.compile(step, backend=backend, fullgraph=True)):
            if isinstance(leaves, dict):
                kwargs = {k: v.clone().requires_grad_() for k, v in leaves.items()}
                inputs, loss = list(kwargs.values()), fn(**kwargs)
            else:
                inputs = [t.clone().requires_grad_() for t in leaves]
                loss = fn(*inputs)
            results.append([loss, *torch.autograd.grad(loss, inputs)])
    finally:
        torch._dynamo.reset()
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    forward = "\n".join(g.code for g in backend.fw_graphs)
    backward = "\n".join(g.code for g in backend.bw_graphs)
    return forward, backward
