"""The settings object, the settings patch, and what the solver engine may import."""
from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest
import torch

import rampde_fx
from rampde_fx import runtime

PACKAGE = pathlib.Path(rampde_fx.__file__).parent


def test_solve_config_is_validated_and_frozen():
    """A SolveConfig refuses bad settings when made, stands for the default policy with None,
    and cannot be changed afterwards."""
    config = rampde_fx.SolveConfig(dtype=torch.float16)
    assert config.dynamic_scaling and not config.keeps_stages
    assert config.policy is rampde_fx.DEFAULT_POLICY
    assert not rampde_fx.SolveConfig(scaling="none", dtype=torch.float16).dynamic_scaling
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dtype = torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        rampde_fx.SolveConfig(dtype=torch.int32)
    with pytest.raises(ValueError, match="scaling must be one of"):
        rampde_fx.SolveConfig(scaling="static")
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        rampde_fx.SolveConfig(checkpoint="all")
    with pytest.raises(ValueError, match="checkpoint='stages' has no per-step adjoint scaling"):
        rampde_fx.SolveConfig(dtype=torch.float16, checkpoint="stages")
    with pytest.raises(TypeError, match="policy must be a rampde_fx.PrecisionPolicy"):
        rampde_fx.SolveConfig(policy={"tanh"})


def test_config_or_keywords_not_both():
    """odeint and convert take a SolveConfig in place of the settings keywords, which give
    the same solve; both at once is refused."""
    torch.manual_seed(0)
    func = torch.nn.Linear(3, 3)
    y0, t = torch.randn(4, 3), torch.linspace(0, 1, 3)
    config = rampde_fx.SolveConfig(dtype=torch.float32)
    by_config = rampde_fx.odeint(lambda t, y: func(y), y0, t, method="rk4", config=config)
    by_keywords = rampde_fx.odeint(lambda t, y: func(y), y0, t, method="rk4",
                                   dtype=torch.float32)
    assert torch.equal(by_config, by_keywords)
    with pytest.raises(ValueError, match=r"pass either config or \['dtype'\]"):
        rampde_fx.odeint(func, y0, t, dtype=torch.float16, config=config)
    with pytest.raises(ValueError, match=r"rampde_fx.convert: pass either config or"):
        rampde_fx.convert(torch.nn.Linear(2, 2), checkpoint="stages", config=config)
    with pytest.raises(TypeError, match="config must be a rampde_fx.SolveConfig"):
        rampde_fx.convert(torch.nn.Linear(2, 2), config={"dtype": torch.float32})


def test_patch_restores_the_settings():
    """runtime.patch changes settings inside its block only, also when the block raises, and
    refuses names that are no setting."""
    before = dataclasses.asdict(runtime.settings)
    with pytest.raises(KeyError):
        with runtime.patch(kernel_backend="aot_eager", small_matmul=0) as settings:
            assert (settings.kernel_backend, settings.small_matmul) == ("aot_eager", 0)
            raise KeyError
    assert dataclasses.asdict(runtime.settings) == before
    with pytest.raises(AttributeError, match="no settings \\['backend'\\]"):
        with runtime.patch(backend="aot_eager"):
            pass


@pytest.mark.parametrize("package", ["engine", "adjoint", "capture", "passes"])
def test_solver_layers_do_not_name_the_compiler_stack(package):
    """Below the compiled path, no module imports dynamo, inductor or the compiled package:
    kernels reach the engine only through its StepExecutor interface."""
    for path in (PACKAGE / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("torch._dynamo", "torch._inductor")) \
                    and "compiled" not in name, \
                    f"{path.name} imports {name}"


def test_trampolines_can_be_uninstalled():
    """uninstall gives torchdiffeq's solver functions their own code back; the next convert
    installs the trampolines again and converts as before."""
    import torchdiffeq

    from rampde_fx.interception import trampolines

    trampolines.install()
    patched = torchdiffeq.odeint.__code__
    trampolines.uninstall()
    try:
        assert torchdiffeq.odeint.__code__ is not patched
        assert "trampoline" not in torchdiffeq.odeint.__code__.co_filename
    finally:
        rampde_fx.convert(torch.nn.Linear(2, 2))  # installs them again
    assert torchdiffeq.odeint.__code__.co_filename.startswith("<rampde_fx trampoline")
