"""``refattn.hf`` and ``refattn.flex`` are importable without their peers: torch and transformers are
imported only when called, and their absence is a BackendUnavailable naming the 'peers' extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from refattn.errors import BackendUnavailable


def test_importing_imports_neither_torch_nor_transformers():
    code = ("import sys, refattn.hf, refattn.flex, refattn.hf.spec, refattn.hf.hooks; "
            "print(any(m in sys.modules for m in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_without_the_peers_extra_a_named_error(monkeypatch):
    from refattn import flex, hf
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(BackendUnavailable, match=r"^refattn.hf: needs torch and transformers, the 'peers' "
                                                 r"extra: pip install 'refattn\[peers\]'"):
        hf.attention_spec({"model_type": "llama"}, 0)
    with pytest.raises(BackendUnavailable, match=r"^refattn.flex: needs torch"):
        flex.pattern_from_mask_mod(lambda b, h, q, kv: q >= kv, 1, 1, 4, 4)
