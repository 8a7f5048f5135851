"""Bad input fails early with a ValueError naming the argument; impl never falls back."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import sparsek

KERNELS_DIR = Path(sparsek.__file__).resolve().parent.parent


@pytest.fixture
def call(make_inputs):
    """Call sparsek_attention on valid inputs with some arguments replaced."""
    x = make_inputs(batch=2, q_heads=4, kv_heads=2, seq_len=10, dim=8, dtype=torch.float32)

    def run(**changes):
        args = dict(q=x.q, k=x.k, v=x.v, u=x.u, kv_budget=3, window=2, impl="reference")
        args.update(changes)
        return sparsek.sparsek_attention(**args)

    run.inputs = x
    return run


def with_nan(u: torch.Tensor, value: float) -> torch.Tensor:
    u = u.clone()
    u[1, 0, 7] = value
    return u


BAD_INPUTS = {
    "q rank": (lambda x: {"q": x.q[0]}, r"^q must be a 4-D tensor.*\(4, 10, 8\) \(rank 3\)"),
    "k rank": (lambda x: {"k": x.k[..., None]}, r"^k must be a 4-D tensor"),
    "v rank": (lambda x: {"v": x.v.flatten(0, 1)}, r"^v must be a 4-D tensor"),
    "u rank": (lambda x: {"u": x.u[..., None]}, r"^u must be a 3-D tensor"),
    "q not a tensor": (lambda x: {"q": x.q.tolist()}, r"^q must be a torch.Tensor.*list"),
    "q empty": (lambda x: {"q": x.q[:, :, :0]}, r"^q must not be empty"),
    "q int": (lambda x: {"q": x.q.int()}, r"^q must have dtype.*torch.int32"),
    "k dtype": (lambda x: {"k": x.k.half()}, r"^k must have q's dtype.*torch.float16"),
    "v dtype": (lambda x: {"v": x.v.double()}, r"^v must have q's dtype.*torch.float64"),
    "u dtype": (lambda x: {"u": x.u.bfloat16()}, r"^u must have dtype.*torch.bfloat16"),
    "k device": (lambda x: {"k": x.k.to("meta")}, r"^k must be on q's device.*meta"),
    "u device": (lambda x: {"u": x.u.to("meta")}, r"^u must be on q's device.*meta"),
    "k length": (lambda x: {"k": x.k[:, :, :9]}, r"^k must be \[B=2, Hkv, S=10, D=8\]"),
    "v shape": (lambda x: {"v": x.v[:, :1]}, r"^v must have k's shape"),
    "u shape": (lambda x: {"u": x.u[:, :, :9]}, r"^u must be \[B=2, Hkv=2, S=10\].*\(2, 2, 9\)"),
    "groups": (lambda x: {"q": x.q[:, :3]}, r"^Hq % Hkv must be 0.*Hq=3.*Hkv=2"),
    "u nan": (lambda x: {"u": with_nan(x.u, float("nan"))}, r"^u must be finite; got nan at"),
    "u inf": (lambda x: {"u": with_nan(x.u, float("inf"))}, r"^u must be finite; got inf at"),
    "budget < 0": (lambda x: {"kv_budget": -1}, r"^kv_budget must be >= 0; got -1"),
    "budget float": (lambda x: {"kv_budget": 2.5}, r"^kv_budget must be an int.*2.5"),
    "budget bool": (lambda x: {"kv_budget": True}, r"^kv_budget must be an int.*True"),
    "window < 0": (lambda x: {"window": -3}, r"^window must be >= 0; got -3"),
    "causal str": (lambda x: {"causal": "yes"}, r"^causal must be a bool.*'yes'"),
    "scale 0": (lambda x: {"scale": 0.0}, r"^scale must be finite and > 0; got 0.0"),
    "scale < 0": (lambda x: {"scale": -0.1}, r"^scale must be finite and > 0; got -0.1"),
    "scale nan": (lambda x: {"scale": float("nan")}, r"^scale must be finite and > 0; got nan"),
    "scale inf": (lambda x: {"scale": float("inf")}, r"^scale must be finite and > 0; got inf"),
    "scale str": (lambda x: {"scale": "0.1"}, r"^scale must be a positive float.*'0.1'"),
    "out shape": (lambda x: {"out": torch.empty(2, 4, 9, 8)}, r"^out must match q.*\(2, 4, 9, 8\)"),
    "out dtype": (lambda x: {"out": torch.empty_like(x.q).half()}, r"^out must match q.*float16"),
    "impl": (lambda x: {"impl": "bogus"}, r"^impl must be one of.*'bogus'"),
    "triton head dim": (lambda x: {"impl": "triton"}, r"^D \(q.shape\[-1\]\) must be one of.* 8"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_names_the_argument(call, case):
    change, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call(**change(call.inputs))


def test_valid_inputs_pass(call):
    assert call().shape == call.inputs.q.shape
    assert call(scale=0.3, causal=False, kv_budget=0, window=100).shape == call.inputs.q.shape


def test_triton_import_failure_raises_instead_of_falling_back(make_inputs, poisoned, monkeypatch):
    x = make_inputs(seq_len=10, dim=64, dtype=torch.float32)
    out = poisoned(x.q)
    # None in sys.modules makes the import itself fail, as a missing triton would.
    monkeypatch.setitem(sys.modules, "sparsek.triton_fwd", None)
    with pytest.raises(ImportError, match=r"impl='triton' needs triton.*impl='reference'"):
        sparsek.sparsek_attention(x.q, x.k, x.v, x.u, kv_budget=3, window=2, out=out)
    assert out.isnan().all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kv_budget": -2}, r"^kv_budget must be >= 0"),
        ({"window": None}, r"^window must be an int"),
        ({"causal": 1}, r"^causal must be a bool"),
        ({"query_index": torch.tensor([0, 10])}, r"^query_index must lie in \[0, S=10\).*10\]"),
        ({"query_index": torch.tensor([-1])}, r"^query_index must lie in"),
        ({"query_index": torch.tensor([1.0])}, r"^query_index must be an integer tensor"),
        ({"query_index": torch.tensor([[1]])}, r"^query_index must be a 1-D tensor"),
    ],
)
def test_mask_rejects_bad_arguments(make_inputs, kwargs, message):
    x = make_inputs(seq_len=10)
    args = {"kv_budget": 2, "window": 1, "causal": True} | kwargs
    with pytest.raises(ValueError, match=message):
        sparsek.sparsek_mask(x.u, **args)


def test_mask_rejects_bad_scores():
    with pytest.raises(ValueError, match=r"^u must have dtype"):
        sparsek.sparsek_mask(
            torch.zeros(1, 1, 4, dtype=torch.int64), kv_budget=1, window=0, causal=True
        )
    with pytest.raises(ValueError, match=r"^u must be a 3-D tensor"):
        sparsek.sparsek_mask(torch.ones(4), kv_budget=1, window=0, causal=True)


def test_scorer_rejects_wrong_width():
    scorer = sparsek.SparseKScorer(d_model=16, kv_heads=2)
    with pytest.raises(ValueError, match=r"^x must have last dimension d_model=16"):
        scorer(torch.randn(1, 5, 15))
    with pytest.raises(ValueError, match=r"^x must be a 3-D tensor"):
        scorer(torch.randn(5, 16))
    with pytest.raises(ValueError, match=r"^positions must be \[S=5\]"):
        scorer(torch.randn(1, 5, 16), positions=torch.arange(4))


def test_all_is_sorted_and_complete():
    public = {
        name
        for name, value in vars(sparsek).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert sparsek.__all__ == sorted(sparsek.__all__)
    assert set(sparsek.__all__) == public
    assert all(hasattr(sparsek, name) for name in sparsek.__all__)


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; import sparsek; "
        "assert 'sparsek.triton_fwd' not in sys.modules; print(len(sparsek.__all__))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(KERNELS_DIR)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(sparsek.__all__))
