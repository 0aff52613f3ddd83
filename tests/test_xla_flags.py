"""The XLA:CPU workarounds (hybrid_twin.xla_flags): which jaxlib releases get them, that a
user's own setting wins, and that in this process they took effect (no YNN fusion in a
compiled dot, which the affected releases otherwise emit)."""

import os
import re

import jax
import jax.numpy as jnp
import jaxlib
import pytest

from hybrid_twin import xla_flags
from hybrid_twin.xla_flags import YNN_OFF, YNN_OPTION, apply, workaround_flags


def test_only_the_affected_jaxlib_releases_get_the_ynn_flag():
    assert workaround_flags("0.10.2") == [YNN_OFF]
    assert workaround_flags("0.11.0") == [YNN_OFF]
    assert workaround_flags("0.11.1.dev20260901") == [YNN_OFF]
    # older releases do not know the option (an unknown XLA option aborts the process)
    assert workaround_flags("0.10.1") == []
    assert workaround_flags("0.4.35") == []
    assert workaround_flags("0.12.0") == []


def test_a_users_own_setting_and_the_off_switch_are_respected():
    env = {"XLA_FLAGS": f"--{YNN_OPTION}=dot"}
    assert apply(env) == [] and env["XLA_FLAGS"] == f"--{YNN_OPTION}=dot"
    env = {xla_flags.ENV_SWITCH: "off", "XLA_FLAGS": "--xla_foo=1"}
    assert apply(env) == [] and env["XLA_FLAGS"] == "--xla_foo=1"
    env = {"XLA_FLAGS": "--xla_foo=1"}
    added = apply(env)
    assert env["XLA_FLAGS"] == " ".join(["--xla_foo=1", *added])
    assert added == workaround_flags(jaxlib.__version__)


def test_the_workaround_is_in_effect_in_this_process():
    """conftest.py applied it before JAX started: a float64 matrix product, which the
    affected releases compile to a `__ynn_fusion`, compiles without one."""
    if os.environ.get(xla_flags.ENV_SWITCH, "").lower() in ("off", "0", "false", "no"):
        pytest.skip(f"{xla_flags.ENV_SWITCH} switches the workarounds off")
    a = jnp.ones((64, 64))
    text = jax.jit(lambda x, y: jnp.sum(x[:, :, None] * y[None, :, :], axis=1)).lower(
        a, a).compile().as_text()
    if workaround_flags(jaxlib.__version__):
        assert YNN_OFF in os.environ["XLA_FLAGS"]
        assert not re.search(r"ynn_fusion", text)
