"""Bad input gets a clear error at construction, init or update, never a silent NaN.

And non-finite gradients: what ``optax.apply_if_finite`` does (skips the step and
keeps the state), what happens without it (exactly which elements are poisoned),
and the opt-in per-element skip ``skip_nonfinite=True``.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax

CONSTRUCTORS = {
    "scale_by_adamax": ax.scale_by_adamax,
    "adamax": ax.adamax,
    "adamaxw": ax.adamaxw,
    "nadamax": ax.nadamax,
    "inject_hyperparams": lambda **kw: optax.inject_hyperparams(ax.adamax)(learning_rate=0.1, **kw),
}


def _msg(*parts: str) -> str:
    """A regex that requires each literal part, in order."""
    return ".*".join(re.escape(p) for p in parts)


# --- parameters and gradients of the wrong kind -----------------------------------------


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
def test_integer_or_boolean_parameters_are_refused_at_init(name, dtype):
    params = {"layer": {"w": jnp.ones((2, 2)), "steps": jnp.zeros(3, dtype)}}
    with pytest.raises(TypeError, match=_msg("['layer']['steps']", str(jnp.dtype(dtype)))):
        CONSTRUCTORS[name]().init(params)


def test_a_python_int_leaf_is_refused_by_type():
    with pytest.raises(TypeError, match=_msg("[1]", "type int")):
        ax.adamax().init([jnp.ones(2), 3])


def test_python_float_leaves_work_like_arrays():
    tx = ax.adamax(0.1)
    state = tx.init({"a": 1.0, "b": jnp.ones(1)})
    updates, _ = tx.update({"a": 0.5, "b": jnp.full(1, 0.5)}, state)
    np.testing.assert_allclose(float(updates["a"]), float(updates["b"][0]), rtol=0)


def test_integer_gradients_are_refused_at_update():
    tx = ax.adamax()
    state = tx.init({"w": jnp.ones(3)})
    with pytest.raises(TypeError, match=_msg("gradient leaf ['w']", "int32")):
        tx.update({"w": jnp.ones(3, jnp.int32)}, state)


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_state_that_is_not_an_adamax_state_is_refused(wrapped):
    """What orbax gives back without a target: plain dicts in place of AdamaxState."""
    params = {"w": jnp.ones(3)}
    tx = ax.adamax() if wrapped else ax.scale_by_adamax()
    state = tx.init(params)

    def to_dict(x: Any) -> Any:
        return dict(x._asdict()) if isinstance(x, ax.AdamaxState) else x

    as_dicts = jax.tree.map(to_dict, state, is_leaf=lambda x: isinstance(x, ax.AdamaxState))
    with pytest.raises(TypeError, match="AdamaxState"):
        tx.update(params, as_dicts)


# --- gradients that do not match the state --------------------------------------------

PARAMS = {"enc": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, "head": (jnp.ones(1), jnp.ones(2))}

TREE_MISMATCHES = {
    # name: (gradients, the paths the message must name)
    "renamed": (
        {"enc": {"w": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "head": PARAMS["head"]},
        ["['enc']['bias'] is in the gradients", "['enc']['b'] is in state.m"],
    ),
    "missing": (
        {"enc": {"w": jnp.ones((2, 3))}, "head": PARAMS["head"]},
        ["['enc']['b'] is in state.m but not in the gradients"],
    ),
    "extra": (
        {**PARAMS, "new": jnp.ones(1)},
        ["['new'] is in the gradients but not in state.m"],
    ),
    "none_leaf": (
        {"enc": {"w": jnp.ones((2, 3)), "b": None}, "head": PARAMS["head"]},
        ["['enc']['b'] is in state.m but not in the gradients"],
    ),
    "list_for_tuple": (
        {"enc": PARAMS["enc"], "head": list(PARAMS["head"])},
        ["containers differ", "[*, *]", "(*, *)"],
    ),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", list(TREE_MISMATCHES))
def test_gradient_tree_mismatch_names_the_first_differing_path(case, jit):
    grads, parts = TREE_MISMATCHES[case]
    tx = ax.scale_by_adamax()
    state = tx.init(PARAMS)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match="does not match the optimizer state") as info:
        update(grads, state)
    for part in parts:
        assert part in str(info.value)


def test_tree_mismatch_with_8bit_state_names_the_parameter_path():
    params = {"big": jnp.ones((64, 64)), "small": jnp.ones(3)}
    tx = ax.scale_by_adamax(state_bits=8)
    state = tx.init(params)
    with pytest.raises(ValueError, match=_msg("['bigger'] is in the gradients", "['big']")):
        tx.update({"bigger": jnp.ones((64, 64)), "small": jnp.ones(3)}, state)


SHAPE_CASES = {
    "longer": ((3,), (4,)),
    "transposed": ((2, 3), (3, 2)),
    "scalar_vs_vector": ((), (1,)),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_gradient_shape_mismatch_names_the_path_and_both_shapes(case, jit):
    param_shape, grad_shape = SHAPE_CASES[case]
    tx = ax.adamax()
    state = tx.init({"x": {"w": jnp.ones(param_shape)}})
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(
        ValueError, match=_msg("['x']['w']", f"shape {grad_shape}", f"{param_shape} (m)")
    ):
        update({"x": {"w": jnp.ones(grad_shape)}}, state)


def test_gradient_shape_mismatch_with_8bit_state():
    tx = ax.adamax(state_bits=8)
    state = tx.init({"w": jnp.ones((64, 64))})
    with pytest.raises(ValueError, match=_msg("['w']", "(64, 65)", "(64, 64)")):
        tx.update({"w": jnp.ones((64, 65))}, state)


# --- hyperparameters ---------------------------------------------------------------------

NONFINITE = [float("nan"), float("inf"), -float("inf"), np.float32("nan"), jnp.array(jnp.inf)]


@pytest.mark.parametrize("value", NONFINITE, ids=repr)
@pytest.mark.parametrize(
    ("constructor", "name"),
    [
        (ax.scale_by_adamax, "b1"),
        (ax.scale_by_adamax, "b2"),
        (ax.scale_by_adamax, "eps"),
        (ax.adamax, "learning_rate"),
        (ax.nadamax, "learning_rate"),
        (ax.adamaxw, "weight_decay"),
        (ax.adamaxw, "b1"),
    ],
)
def test_nonfinite_hyperparameters_are_refused(constructor, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must .*got -?(nan|inf)"):
        constructor(**{name: value})


OUT_OF_RANGE = [
    ("b1", 1.0, r"b1 must lie in \[0.0, 1.0\), got 1.0"),
    ("b1", -0.1, r"b1 must lie in \[0.0, 1.0\), got -0.1"),
    ("b2", 1.001, r"b2 must lie in \[0.0, 1.0\], got 1.001"),
    ("eps", -1e-8, r"eps must lie in \[0.0, inf\), got -1e-08"),
    # Below 1 as a Python float, exactly 1 in float32: 1 / (1 - b1**t) would be inf.
    ("b1", 1 - 1e-8, r"b1 must lie in \[0.0, 1.0\) after rounding to float32.*rounds to 1.0"),
    ("eps", 1e39, r"eps must lie .* after rounding to float32.*rounds to inf"),
]


@pytest.mark.parametrize(("name", "value", "message"), OUT_OF_RANGE)
def test_out_of_range_hyperparameters_are_refused(name, value, message):
    with pytest.raises(ValueError, match=message):
        ax.adamax(**{name: value})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0.9", r"b1 must be a real number, got str '0.9'"),
        (True, r"b1 must be a real number, got the boolean True"),
        (0.9 + 0.1j, r"b1 must be a real number, got the complex value"),
        ([0.9], None),  # a non-scalar is not refused here: under vmap they are arrays
    ],
)
def test_hyperparameters_that_are_not_numbers_are_refused(value, message):
    if message is None:
        ax.adamax(b1=value)  # arrays of valid values pass
        return
    with pytest.raises(TypeError, match=message):
        ax.adamax(b1=value)


def test_array_hyperparameters_are_checked_element_by_element():
    with pytest.raises(ValueError, match=r"b1 must lie in \[0.0, 1.0\)"):
        ax.scale_by_adamax(b1=np.array([0.9, 1.5]))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"m_dtype": jnp.int8}, TypeError, "m_dtype must be a floating dtype"),
        ({"u_dtype": "float33"}, TypeError, "u_dtype must be a floating dtype or None"),
        ({"eps_placement": "min"}, ValueError, "eps_placement must be one of"),
        # float8 moments would fail at update with a type-promotion error.
        (
            {"m_dtype": "float8_e4m3fn"},
            ValueError,
            "m_dtype must be float16, bfloat16.*state_bits=8",
        ),
        ({"u_dtype": jnp.float8_e5m2}, ValueError, "u_dtype must be float16, bfloat16"),
    ],
)
def test_bad_options_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        ax.adamax(**kwargs)


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("lazy", ValueError, "got the string 'lazy'"),
        ("catchup", ValueError, "got the string 'catchup'"),
        ("", ValueError, "got the string ''"),
        (1, TypeError, "got int 1"),
        (None, TypeError, "got NoneType None"),
        (0.0, TypeError, "got float 0.0"),
    ],
)
def test_lazy_rows_must_be_a_bool_or_a_known_string(name, value, error, message):
    if name == "inject_hyperparams":
        # Constructed at init; numbers arrive there as arrays, so the type is not named.
        tx = CONSTRUCTORS[name](lazy_rows=value)
        with pytest.raises(error, match=_msg("lazy_rows must be False, True", "catch_up")):
            tx.init(jnp.ones(2))
        return
    with pytest.raises(error, match=_msg("lazy_rows must be False, True", "catch_up", message)):
        CONSTRUCTORS[name](lazy_rows=value)


@pytest.mark.parametrize(("made_with", "used_with"), [("catch_up", True), (False, "catch_up")])
def test_a_state_of_another_lazy_rows_mode_is_refused(made_with, used_with):
    params = {"emb": jnp.ones((4, 2))}
    state = ax.adamax(lazy_rows=made_with).init(params)
    with pytest.raises(ValueError, match=_msg("['emb']", 'lazy_rows="catch_up"', "init")):
        ax.adamax(lazy_rows=used_with).update(params, state)


_BIG = {"w": jnp.ones((64, 128)), "b": jnp.ones(7)}

# (made with, used with, what the message names of each)
_OTHER_CONFIGURATIONS = {
    "8bit-into-float32": (dict(state_bits=8), {}, ("state_bits=8", "state_bits=None")),
    "float32-into-8bit": ({}, dict(state_bits=8), ("state_bits=None", "state_bits=8")),
    "block_size": (
        dict(state_bits=8, block_size=128),
        dict(state_bits=8),
        ("block_size=128", "block_size=256"),
    ),
    "m_dtype": (
        dict(m_dtype="bfloat16"),
        dict(m_dtype="float32"),
        ("m_dtype='bfloat16'", "m_dtype='float32'"),
    ),
    "u_dtype": (
        dict(u_dtype="float16"),
        dict(u_dtype="bfloat16"),
        ("u_dtype='float16'", "u_dtype='bfloat16'"),
    ),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", list(_OTHER_CONFIGURATIONS))
def test_a_state_of_another_configuration_is_refused_naming_both(name, jit):
    made, used, (said_made, said_used) = _OTHER_CONFIGURATIONS[name]
    state = ax.adamax(1e-3, **made).init(_BIG)
    opt = ax.adamax(1e-3, **used)
    update = jax.jit(opt.update) if jit else opt.update
    with pytest.raises(ValueError, match=_msg(said_made, said_used, "init")):
        update(_BIG, state, _BIG)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_hyperparameters_narrower_than_float32_are_refused_at_init(dtype):
    # optax.inject_hyperparams gives hyperparameters the (widest) parameter dtype: in
    # bfloat16, b2=0.999 is 1.0 and u would never decay.
    params = {"w": jnp.zeros(3, dtype)}
    tx = optax.inject_hyperparams(ax.adamax)(learning_rate=1e-3, b2=0.999)
    with pytest.raises(TypeError, match=_msg("arrived as a", "hyperparam_dtype=jnp.float32")):
        tx.init(params)
    fixed = optax.inject_hyperparams(ax.adamax, hyperparam_dtype=jnp.float32)(
        learning_rate=1e-3, b2=0.999
    )
    state = fixed.init(params)
    assert state.hyperparams["b2"] == np.float32(0.999)
    fixed.update(params, state, params)


def test_traced_hyperparameters_pass_unchecked_into_inject_hyperparams():
    """Under jit the values cannot be inspected; the constructor must not choke."""
    tx = optax.inject_hyperparams(ax.adamax)(learning_rate=0.1, b1=0.9)
    params = jnp.ones(2)
    updates, _ = jax.jit(tx.update)(jnp.ones(2), tx.init(params), params)
    np.testing.assert_allclose(updates, [-0.1, -0.1], rtol=1e-6)


@pytest.mark.parametrize("block_size", [0, -256, 3, 100, 255])
def test_block_size_must_be_a_positive_power_of_two(block_size):
    with pytest.raises(
        ValueError, match=rf"block_size must be a positive power of two.*{block_size}"
    ):
        ax.adamax(state_bits=8, block_size=block_size)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"state_bits": 4}, ValueError),
        ({"state_bits": 16}, ValueError),
        ({"state_bits": True}, TypeError),
        ({"state_bits": 8, "block_size": 256.0}, TypeError),
    ],
)
def test_state_bits_options_are_checked(kwargs, error):
    name = "block_size" if "block_size" in kwargs else "state_bits"
    with pytest.raises(error, match=name):
        ax.adamax(**kwargs)


# --- negative learning rates: allowed, as in optax, for ascent ----------------------


def test_negative_learning_rate_mirrors_the_positive_one():
    grads = [jnp.array([0.5, -2.0, 0.0]), jnp.array([0.1, 1.0, -3.0])]
    descent, ascent = ax.adamax(0.1), ax.adamax(-0.1)
    s_d, s_a = descent.init(grads[0]), ascent.init(grads[0])
    for g in grads:
        u_d, s_d = descent.update(g, s_d)
        u_a, s_a = ascent.update(g, s_a)
        np.testing.assert_array_equal(np.asarray(u_a), -np.asarray(u_d))


def test_negative_learning_rate_ascends():
    f = lambda x: -jnp.sum((x - 3.0) ** 2)  # a maximum at 3
    tx = ax.adamax(learning_rate=optax.constant_schedule(-0.1))
    x = jnp.zeros(2)
    state = tx.init(x)

    @jax.jit
    def step(x, state):
        updates, state = tx.update(jax.grad(f)(x), state)
        return optax.apply_updates(x, updates), state

    values = [float(f(x))]
    for _ in range(50):
        x, state = step(x, state)
        values.append(float(f(x)))
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[0] == -18.0 and values[-1] > -0.2  # climbed to near the maximum, 0


# --- non-finite gradients -------------------------------------------------------------

BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}


def _params_and_grads() -> tuple[dict[str, jax.Array], list[dict[str, jax.Array]]]:
    params = {"a": jnp.zeros(4), "b": jnp.zeros((2, 2))}
    grads = [
        {"a": jnp.array([1.0, -0.5, 2.0, 0.25]), "b": jnp.array([[0.5, 0.0], [-1.0, 3.0]])},
        {"a": jnp.array([0.5, 0.5, -1.0, 0.0]), "b": jnp.array([[1.0, 2.0], [0.0, -1.0]])},
        {"a": jnp.array([-0.2, 1.5, 0.3, 1.0]), "b": jnp.array([[0.0, -2.0], [1.0, 0.5]])},
    ]
    return params, grads


def _poison(grads: dict[str, jax.Array], value: float) -> dict[str, jax.Array]:
    """The same gradients with element 1 of leaf 'a' replaced by ``value``."""
    return {**grads, "a": grads["a"].at[1].set(value)}


def _bytes(tree: Any) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_apply_if_finite_skips_the_step_and_keeps_the_state(bad):
    params, grads = _params_and_grads()
    tx = optax.apply_if_finite(ax.adamax(0.1), max_consecutive_errors=3)
    clean = optax.apply_if_finite(ax.adamax(0.1), max_consecutive_errors=3)
    update = jax.jit(tx.update)

    state = update(grads[0], tx.init(params))[1]
    before = state.inner_state
    updates, state = update(_poison(grads[1], BAD_VALUES[bad]), state)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert _bytes(state.inner_state) == _bytes(before)  # count included: not advanced
    assert int(state.notfinite_count) == 1 and not bool(state.last_finite)

    # The next finite step is exactly the step of a run that never saw the bad one.
    updates, state = update(grads[2], state)
    c_state = jax.jit(clean.update)(grads[0], clean.init(params))[1]
    c_updates, c_state = jax.jit(clean.update)(grads[2], c_state)
    assert _bytes(updates) == _bytes(c_updates)
    assert _bytes(state.inner_state) == _bytes(c_state.inner_state)


@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_without_protection_a_nonfinite_gradient_poisons_only_its_own_element(bad):
    """Adamax is elementwise: the bad element's m and u become non-finite for good;
    every other element (and every other leaf) is bit for bit what it would be with
    a finite gradient in that place."""
    params, grads = _params_and_grads()
    tx = ax.scale_by_adamax()
    update = jax.jit(tx.update)
    state = update(grads[0], tx.init(params))[1]

    d_bad, s_bad = update(_poison(grads[1], BAD_VALUES[bad]), state)
    d_ok, s_ok = update(grads[1], state)
    assert int(s_bad.count) == int(s_ok.count) == 2

    def others(x):
        return np.delete(np.asarray(x), 1)

    for tree_bad, tree_ok in ((d_bad, d_ok), (s_bad.m, s_ok.m), (s_bad.u, s_ok.u)):
        assert others(tree_bad["a"]).tobytes() == others(tree_ok["a"]).tobytes()
        assert np.asarray(tree_bad["b"]).tobytes() == np.asarray(tree_ok["b"]).tobytes()

    m1, u1 = float(s_bad.m["a"][1]), float(s_bad.u["a"][1])
    if bad == "nan":
        assert np.isnan(m1) and np.isnan(u1)
    else:  # +-inf: m takes the sign, u is +inf, and their ratio inf/inf is NaN
        assert m1 == BAD_VALUES[bad] and u1 == np.inf
        assert np.isnan(float(d_bad["a"][1]))

    # Later finite gradients do not heal the element: NaN (or inf/inf) for good.
    d_next, s_next = update(grads[2], s_bad)
    assert not np.isfinite(float(s_next.m["a"][1])) and not np.isfinite(float(s_next.u["a"][1]))
    assert np.all(np.isfinite(others(d_next["a"]))) and np.all(np.isfinite(d_next["b"]))


def test_a_nan_gradient_shows_as_a_nan_update():
    """The element is poisoned for good, so its update must say so (not a silent 0
    that would freeze the parameter while the loss looks fine)."""
    params, grads = _params_and_grads()
    tx = ax.scale_by_adamax()
    state = tx.update(grads[0], tx.init(params))[1]
    d, state = tx.update(_poison(grads[1], float("nan")), state)
    assert np.isnan(float(d["a"][1]))
    d, _ = tx.update(grads[2], state)
    assert np.isnan(float(d["a"][1]))


@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_with_8bit_state_a_nonfinite_gradient_stays_inside_its_block(bad):
    """8-bit u shares one scale per block: the damage may reach the element's block
    of ``block_size`` elements, never further."""
    block = 256
    g0 = jnp.asarray(np.random.default_rng(0).standard_normal(8 * block), jnp.float32)
    g1 = g0[::-1] * 0.5
    tx = ax.scale_by_adamax(state_bits=8, block_size=block)
    update = jax.jit(tx.update)
    state = update(g0, tx.init(g0))[1]
    d_bad, s_bad = update(g1.at[block + 7].set(BAD_VALUES[bad]), state)
    d_ok, s_ok = update(g1, state)
    outside = np.r_[0:block, 2 * block : 8 * block]
    np.testing.assert_array_equal(np.asarray(d_bad)[outside], np.asarray(d_ok)[outside])
    # One step later, still confined to the block.
    d_bad, _ = update(g0, s_bad)
    d_ok, _ = update(g0, s_ok)
    np.testing.assert_array_equal(np.asarray(d_bad)[outside], np.asarray(d_ok)[outside])


@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_skip_nonfinite_leaves_the_bad_elements_untouched(bad):
    params, grads = _params_and_grads()
    tx = ax.scale_by_adamax(skip_nonfinite=True)
    plain = ax.scale_by_adamax()
    # Eager, op by op: two different jitted programs may fuse a multiply-add
    # differently, and this compares bits.
    state = tx.update(grads[0], tx.init(params))[1]

    d, new = tx.update(_poison(grads[1], BAD_VALUES[bad]), state)
    d_ok, s_ok = plain.update(grads[1], state)
    assert float(d["a"][1]) == 0.0
    assert float(new.m["a"][1]) == float(state.m["a"][1])
    assert float(new.u["a"][1]) == float(state.u["a"][1])
    keep = np.array([0, 2, 3])
    for tree, ref in ((d, d_ok), (new.m, s_ok.m), (new.u, s_ok.u)):
        assert np.asarray(tree["a"])[keep].tobytes() == np.asarray(ref["a"])[keep].tobytes()
        assert np.asarray(tree["b"]).tobytes() == np.asarray(ref["b"]).tobytes()
    assert int(new.count) == 2  # the step happened for every other element


def test_skip_nonfinite_is_free_when_gradients_are_finite():
    params, grads = _params_and_grads()
    for kwargs in ({}, {"nesterov": True}, {"lazy_rows": True}):
        a, b = ax.adamax(0.1, **kwargs), ax.adamax(0.1, skip_nonfinite=True, **kwargs)
        sa, sb = a.init(params), b.init(params)
        for g in grads:
            ua, sa = a.update(g, sa)
            ub, sb = b.update(g, sb)
            assert _bytes((ua, sa)) == _bytes((ub, sb))


def test_skip_nonfinite_with_8bit_state_keeps_every_block_finite():
    g = jnp.asarray(np.random.default_rng(1).standard_normal(4096), jnp.float32)
    tx = ax.scale_by_adamax(state_bits=8, skip_nonfinite=True)
    update = jax.jit(tx.update)
    state = update(g, tx.init(g))[1]
    d, state = update(g.at[3].set(jnp.inf).at[900].set(jnp.nan), state)
    d2, state = update(g, state)
    assert float(d[3]) == 0.0 and float(d[900]) == 0.0
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(d2))
    assert all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", ["bias_correction", "nesterov", "skip_nonfinite"])
@pytest.mark.parametrize("value", ["yes", 1, None, np.array(True)])
def test_boolean_options_must_be_bools(name, value):
    # A truthy string or number is not a yes: it would silently switch the option on.
    with pytest.raises(TypeError, match=rf"{name} must be True or False, got"):
        ax.scale_by_adamax(**{name: value})


def test_block_size_none_means_256():
    params = {"w": jnp.ones((64, 64))}
    default = ax.adamax(state_bits=8).init(params)[0].u["w"]
    explicit = ax.adamax(state_bits=8, block_size=256).init(params)[0].u["w"]
    assert default.block_size == explicit.block_size == 256
    assert default.scales.shape == (16,)
