"""FSDP2 and tensor parallel on CPU: 2 (and, for FSDP over TP, 4) gloo processes vs the
single-process run.

The checks themselves live in dist_worker.py (run once, in a subprocess that spawns 2 ranks);
each test below asserts on one check's measured relative errors. fp32 throughout: sharding only
changes summation order, so errors must stay at rounding level.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
TOL = 1e-4

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


def _run_worker(tmp_path_factory, world, device="cpu"):
    out = tmp_path_factory.mktemp("dist") / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("MAMBA_PKG_BACKEND", None)
    command = [sys.executable, WORKER, str(out), "--world", str(world), "--device", device]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and out.exists(), f"distributed worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """2 ranks: the TP and FSDP checks."""
    return _run_worker(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def results_2d(tmp_path_factory):
    """4 ranks: the (dp=2, tp=2) check."""
    return _run_worker(tmp_path_factory, 4)


def _assert_small(results, check, expect=(), tol=TOL):
    result = results[check]
    assert result["error"] is None, f"{check} raised on a rank:\n{result['error']}"
    values = result["values"]
    for key in expect:
        assert key in values, f"{check}: {key!r} was not measured (got {sorted(values)})"
    bad = {key: err for key, err in values.items() if not err <= tol}
    assert not bad, f"{check}: relative errors above {tol}: {bad}"


@pytest.mark.parametrize(
    "check, column_weight",
    [
        ("tp_gated_mlp", "fc1.weight"),
        ("tp_mha", "in_proj.weight"),
        ("tp_mamba", "in_proj.weight"),
        ("tp_mamba2_ngroups1", "in_proj.weight"),
        ("tp_mamba2_ngroups2", "in_proj.weight"),
        ("tp_mamba2_mlp", "in_proj.weight"),
    ],
)
def test_tensor_parallel_mixer_matches_single_process(results, check, column_weight):
    # output, input gradient, every parameter gradient, and the gathered state dict
    expect = ["output", "input grad", f"grad {column_weight}", f"state {column_weight}"]
    if check in ("tp_mha", "tp_mamba", "tp_mamba2_ngroups1", "tp_mamba2_ngroups2"):
        expect += ["packed output", "packed input grad"]  # cu_seqlens batches
    _assert_small(results, check, expect=tuple(expect))


def test_tensor_parallel_lm_loss_grads_step_and_checkpoint(results):
    _assert_small(
        results,
        "tp_lm",
        expect=("loss", "logits", "grad backbone.embedding.weight", "grad norm", "reloaded logits", "from_pretrained logits"),
    )


def test_tensor_parallel_mamba1_lm(results):
    _assert_small(results, "tp_lm_mamba1", expect=("loss", "grad backbone.layers.0.mixer.x_proj.weight", "dcp reloaded logits"))


def test_tensor_parallel_generate_matches_single_process(results):
    _assert_small(results, "tp_generate", expect=("hybrid tokens differ", "hybrid scores", "mamba1 scores"))


def test_fsdp_lm_matches_single_process(results):
    _assert_small(results, "fsdp_lm", expect=("loss", "grad backbone.layers.0.mixer.in_proj.weight", "grad norm", "reloaded logits", "dcp reloaded logits"))


def test_fsdp_over_tensor_parallel_2d_lm(results_2d):
    _assert_small(
        results_2d, "fsdp_tp_2d_lm", expect=("loss", "grad backbone.layers.1.mixer.in_proj.weight", "grad norm")
    )


@pytest.mark.parametrize(
    "case, size",
    [("mamba2 nheads", "nheads"), ("mamba2 ngroups", "ngroups"), ("mha kv heads", "num_heads_kv")],
)
def test_tensor_parallel_size_must_divide(results, case, size):
    result = results["tp_errors"]
    assert result["error"] is None, result["error"]
    message = result["values"][case]
    assert message is not None, f"{case}: no ValueError"
    assert "tensor parallel size 2" in message and size in message, message
    assert result["values"][case + " untouched"], f"{case}: the model was partly sharded before the error"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("2-D mesh", "ValueError: mesh must be a 1-D DeviceMesh"),
        ("no blocks", "ValueError: model (Mamba) holds no mamba_pkg Block"),
    ],
)
def test_misuse_gives_clear_errors(results, case, expected):
    result = results["misuse_errors"]
    assert result["error"] is None, result["error"]
    message = result["values"][case]
    assert message is not None and message.startswith(expected), message


# Same checks on GPUs (nccl, Triton kernels) where a machine has them; CI on CPU skips these.
TOL_CUDA = 2e-3  # Triton kernels (tf32 inside the SSD state walk) on different head counts
GPU_CHECKS = [
    "tp_gated_mlp", "tp_mha", "tp_mamba", "tp_mamba2_ngroups1", "tp_mamba2_ngroups2", "tp_mamba2_mlp",
    "tp_lm", "tp_lm_mamba1", "tp_generate", "fsdp_lm",
]


@pytest.fixture(scope="module")
def results_cuda(tmp_path_factory):
    return _run_worker(tmp_path_factory, 2, device="cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (the CPU gloo tests cover the same checks)")
@pytest.mark.parametrize("check", GPU_CHECKS)
def test_two_gpus_match_single_gpu(results_cuda, check):
    _assert_small(results_cuda, check, tol=TOL_CUDA)


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 CUDA GPUs")
def test_four_gpus_fsdp_over_tensor_parallel(tmp_path_factory):
    _assert_small(_run_worker(tmp_path_factory, 4, device="cuda"), "fsdp_tp_2d_lm", tol=TOL_CUDA)
