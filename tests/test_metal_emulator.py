"""The Metal emulator itself: it rebuilds MLX's kernel source exactly, runs Metal semantics
(thread positions, non-uniform edge threadgroups, simd collectives over active lanes, barriers)
and reports the bugs it exists to catch (missing barrier, out-of-bounds write, off-by-one index,
barrier divergence, unwritten output, threadgroup overruns, address-space mistakes)."""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest

from hnet_metal_kernels import sources
from hnet_metal_kernels.emulator import (
    EmulatorCompileError,
    EmulatorError,
    build_signature,
    clang,
    compiler_available,
    metal_kernel,
)
from hnet_metal_kernels.emulator.signature import mlx_generated_source

pytestmark = pytest.mark.skipif(not compiler_available(), reason="the Metal emulator needs g++ (apt-get install g++)")

needs_clang = pytest.mark.skipif(clang() is None, reason="clang++ not installed (apt-get install clang): address-space check unavailable")


def run(source, inputs, output_shapes, output_dtypes=None, grid=(32, 1, 1), threadgroup=(32, 1, 1), names=None,
        outputs=("out",), template=None, **options):
    names = names or ["x"] + [f"in{i}" for i in range(1, len(inputs))]
    kernel = metal_kernel("t", names, list(outputs), source, **options)
    dtypes = output_dtypes or [mx.float32] * len(output_shapes)
    return kernel(inputs=inputs, output_shapes=output_shapes, output_dtypes=dtypes, grid=grid,
                  threadgroup=threadgroup, template=template)


# -- the rebuilt signature is MLX's ----------------------------------------------------------


SIGNATURE_CASES = {
    "everything": dict(
        input_names=["x", "s", "w"], output_names=["y", "z"],
        source="x_shape x_strides x_ndim w_ndim thread_position_in_grid threads_per_threadgroup "
               "dispatch_threads_per_threadgroup simdgroup_index_in_threadgroup grid_size",
        inputs=[mx.zeros((3, 4)), mx.array(2.0), mx.zeros((5,), dtype=mx.bfloat16)],
        output_shapes=[(3,), (2,)], output_dtypes=[mx.float32, mx.int32],
        template=[("T", mx.float16), ("N", 7), ("B", False), ("C", True)], header="// helper\n",
    ),
    "shape_buffer_before_outputs": dict(  # MLX closes the parameter list early here; so must we
        input_names=["x"], output_names=["y", "z"], source="x_shape[0]",
        inputs=[mx.zeros((9,), dtype=mx.int32)], output_shapes=[(3,), (2,)],
        output_dtypes=[mx.float16, mx.bool_],
    ),
    "dtypes": dict(
        input_names=["a", "b", "c", "d"], output_names=["y"], source="thread_index_in_simdgroup",
        inputs=[mx.zeros((8,), dtype=mx.uint8), mx.zeros((8,), dtype=mx.int64), mx.zeros((2, 8), dtype=mx.uint32),
                mx.zeros((8,), dtype=mx.bool_)],
        output_shapes=[(1,)], output_dtypes=[mx.bfloat16],
    ),
}


@pytest.mark.parametrize("case", sorted(SIGNATURE_CASES))
def test_rebuilt_source_equals_the_source_mlx_generates(case):
    c = SIGNATURE_CASES[case]
    expected = mlx_generated_source("sig", c["input_names"], c["output_names"], c["source"],
                                    c["inputs"], c["output_shapes"], c["output_dtypes"], c.get("template"),
                                    c.get("header", ""))
    meta = [(a.dtype, a.ndim, a.size) for a in c["inputs"]]
    sig = build_signature("sig", c["input_names"], c["output_names"], c["source"], c.get("header", ""), meta,
                          c["output_dtypes"], c.get("template") or ())
    assert sig.source == expected


def test_rebuilt_source_of_a_real_kernel_equals_mlx_for_each_dtype():
    names = ["state", "x", "dt", "dt_bias", "A", "B", "C", "D"]
    src = sources.source("ssm_step")
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        inputs = [mx.zeros((1, 2, 4, 16)), mx.zeros((1, 2, 4), dtype=dtype), mx.zeros((1, 2), dtype=dtype),
                  mx.zeros((2,)), mx.zeros((2,)), mx.zeros((1, 1, 16), dtype=dtype), mx.zeros((1, 1, 16), dtype=dtype),
                  mx.zeros((2,))]
        shapes, dtypes = [(1, 2, 4), (1, 2, 4, 16)], [mx.float32, mx.float32]
        expected = mlx_generated_source("hnet_ssm_step", names, ["y", "new_state"], src, inputs, shapes, dtypes)
        sig = build_signature("hnet_ssm_step", names, ["y", "new_state"], src, "",
                              [(a.dtype, a.ndim, a.size) for a in inputs], dtypes)
        assert sig.source == expected
        assert "const constant float* dt_bias" in sig.source  # 2 elements: constant address space


# -- Metal semantics ----------------------------------------------------------------------


def test_thread_attributes_follow_non_uniform_dispatch():
    # grid 70 x 3 with threadgroups of 32 x 2: edge groups are 6 wide and 1 tall
    src = """
    uint3 g = thread_position_in_grid;
    uint i = g.y * 70 + g.x;
    out[i * 6 + 0] = threadgroup_position_in_grid.x;
    out[i * 6 + 1] = threads_per_threadgroup.x * 10 + threads_per_threadgroup.y;
    out[i * 6 + 2] = thread_index_in_threadgroup;
    out[i * 6 + 3] = simdgroup_index_in_threadgroup * 100 + thread_index_in_simdgroup;
    out[i * 6 + 4] = dispatch_threads_per_threadgroup.x * 10 + dispatch_threads_per_threadgroup.y;
    out[i * 6 + 5] = threadgroups_per_grid.x * 10 + threadgroups_per_grid.y;
    """
    (out,) = run(src, [mx.zeros((1,))], [(3 * 70 * 6,)], [mx.int32], grid=(70, 3, 1), threadgroup=(32, 2, 1))
    out = np.array(out).reshape(3, 70, 6)
    for y in range(3):
        for x in range(70):
            tx, ty = (32 if x < 64 else 6), (2 if y < 2 else 1)
            lx, ly = x % 32, y % 2
            tid = ly * tx + lx
            assert out[y, x].tolist() == [x // 32, tx * 10 + ty, tid, (tid // 32) * 100 + tid % 32, 322, 32]


def test_simd_collectives_run_over_the_active_lanes_of_partial_simdgroups():
    # 40 threads per group: simdgroup 1 has 8 lanes; shuffles from missing lanes give poison
    src = """
    uint i = thread_position_in_grid.x;
    float v = x[i];
    out[i * 7 + 0] = simd_sum(v);
    out[i * 7 + 1] = simd_prefix_inclusive_sum(v);
    out[i * 7 + 2] = simd_prefix_exclusive_sum(v);
    out[i * 7 + 3] = simd_shuffle_down(v, ushort(3));
    out[i * 7 + 4] = simd_shuffle_up(v, ushort(2));
    out[i * 7 + 5] = simd_shuffle_xor(v, ushort(1));
    out[i * 7 + 6] = simd_max(v);
    """
    x = np.random.default_rng(0).standard_normal(40).astype(np.float32)
    with pytest.raises(EmulatorError) as err:  # lanes 37..39 shuffle down from absent lanes 40..42
        run(src, [mx.array(x)], [(40 * 7,)], grid=(40, 1, 1), threadgroup=(64, 1, 1))
    assert "poison" in str(err.value)
    (out,) = run(src, [mx.array(x)], [(40 * 7,)], grid=(40, 1, 1), threadgroup=(64, 1, 1), check_unwritten=False)
    out = np.array(out).reshape(40, 7)
    for lo, hi in ((0, 32), (32, 40)):
        seg = x[lo:hi]
        for i in range(lo, hi):
            lane = i - lo
            np.testing.assert_allclose(out[i, 0], seg.sum(), rtol=1e-6)
            np.testing.assert_allclose(out[i, 1], seg[: lane + 1].sum(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out[i, 2], seg[:lane].sum(), rtol=1e-5, atol=1e-6)
            down = lane + 3
            if down >= 32:
                assert out[i, 3] == x[i]  # Metal leaves the top lanes unchanged
            elif down < hi - lo:
                assert out[i, 3] == seg[down]
            else:
                assert np.isnan(out[i, 3])  # absent source lane
            assert out[i, 4] == (x[i] if lane < 2 else seg[lane - 2])
            assert out[i, 5] == seg[lane ^ 1]
            assert out[i, 6] == seg.max()


def test_divergent_collective_reduces_only_the_lanes_in_the_branch():
    src = """
    uint i = thread_position_in_grid.x;
    float r = -1.0f;
    if (i % 2 == 0) { r = simd_sum(x[i]); }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[i] = r;
    """
    x = np.arange(32, dtype=np.float32)
    (out,) = run(src, [mx.array(x)], [(32,)])
    expected = np.where(np.arange(32) % 2 == 0, x[::2].sum(), -1.0)
    np.testing.assert_array_equal(np.array(out), expected)


def test_threadgroup_memory_is_shared_within_a_group_and_fresh_for_each_group():
    src = """
    threadgroup float buf[64];
    uint t = thread_index_in_threadgroup;
    buf[t] = x[thread_position_in_grid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = buf[63 - t];
    """
    x = np.arange(128, dtype=np.float32)
    (out,) = run(src, [mx.array(x)], [(128,)], grid=(128, 1, 1), threadgroup=(64, 1, 1))
    np.testing.assert_array_equal(np.array(out), np.concatenate([x[:64][::-1], x[64:][::-1]]))


def test_half_and_bfloat_inputs_and_outputs_round_trip():
    src = "uint i = thread_position_in_grid.x; out[i] = static_cast<float>(x[i]) * 2.0f; out2[i] = x[i];"
    for dtype in (mx.float16, mx.bfloat16):
        x = mx.array(np.linspace(-3, 3, 37, dtype=np.float32)).astype(dtype)
        out, out2 = run(src, [x], [(37,), (37,)], [mx.float32, dtype], grid=(37, 1, 1), threadgroup=(16, 1, 1),
                        names=["x"], outputs=("out", "out2"))
        np.testing.assert_array_equal(np.array(out), np.array(x.astype(mx.float32)) * 2)
        assert out2.dtype == dtype
        np.testing.assert_array_equal(np.array(out2.astype(mx.float32)), np.array(x.astype(mx.float32)))


def test_init_value_fills_outputs_before_the_launch():
    src = "if (thread_position_in_grid.x == 0) out[0] = 5.0f;"
    kernel = metal_kernel("t", ["x"], ["out"], src)
    (out,) = kernel(inputs=[mx.zeros((1,))], output_shapes=[(4,)], output_dtypes=[mx.float32], grid=(4, 1, 1),
                    threadgroup=(4, 1, 1), init_value=1.5)
    assert np.array(out).tolist() == [5.0, 1.5, 1.5, 1.5]


# -- the bugs it must catch ----------------------------------------------------------------

SHIFT = """
    threadgroup float buf[32];
    uint t = thread_index_in_threadgroup;
    buf[t] = x[thread_position_in_grid.x];
    BARRIER
    out[thread_position_in_grid.x] = buf[(t + 1) % 32];
"""


def test_missing_barrier_is_reported_as_order_dependence():
    x = mx.arange(64).astype(mx.float32)
    good = SHIFT.replace("BARRIER", "threadgroup_barrier(mem_flags::mem_threadgroup);")
    (out,) = run(good, [x], [(64,)], grid=(64, 1, 1))
    assert np.array(out).tolist() == [float((i // 32) * 32 + (i % 32 + 1) % 32) for i in range(64)]
    with pytest.raises(EmulatorError, match="differs between the ascending and descending thread orders"):
        run(SHIFT.replace("BARRIER", ""), [x], [(64,)], grid=(64, 1, 1))


def test_out_of_bounds_write_is_reported():
    src = "uint i = thread_position_in_grid.x; out[i] = x[i];"  # no bounds check, grid rounded up
    with pytest.raises(EmulatorError, match="past the end of output 'out'"):
        run(src, [mx.zeros((40,))], [(40,)], grid=(64, 1, 1), check_unwritten=False)


def test_out_of_bounds_write_before_an_output_is_reported():
    src = "int i = int(thread_position_in_grid.x) - 1; out[i] = 1.0f;"
    with pytest.raises(EmulatorError, match="before the start of output 'out'"):
        run(src, [mx.zeros((1,))], [(32,)], check_unwritten=False)


def test_off_by_one_read_past_an_input_poisons_the_output():
    src = "uint i = thread_position_in_grid.x; out[i] = x[i + 1];"  # reads x[32] for the last thread
    with pytest.raises(EmulatorError) as err:
        run(src, [mx.zeros((32,))], [(32,)])
    assert "1 of 32 elements hold the poison pattern" in str(err.value) and "(31,)" in str(err.value)


def test_unwritten_output_is_reported():
    src = "uint i = thread_position_in_grid.x; if (i < 31) out[i] = 1.0f;"
    with pytest.raises(EmulatorError, match=r"output 'out': 1 of 32 elements hold the poison pattern.*\(31,\)"):
        run(src, [mx.zeros((1,))], [(32,)])


def test_barrier_skipped_by_returned_threads_is_reported():
    src = """
    threadgroup float buf[64];
    uint i = thread_position_in_grid.x;
    if (i >= 40) return;
    buf[i] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[i] = buf[0];
    """
    with pytest.raises(EmulatorError, match="threadgroup_barrier at line 6 of the kernel body reached by 40 of 64 threads"):
        run(src, [mx.zeros((1,))], [(40,)], grid=(64, 1, 1), threadgroup=(64, 1, 1))


def test_barriers_at_different_call_sites_are_reported():
    src = """
    uint i = thread_position_in_grid.x;
    if (i < 16) { threadgroup_barrier(mem_flags::mem_threadgroup); }
    else { threadgroup_barrier(mem_flags::mem_threadgroup); }
    out[i] = 1.0f;
    """
    with pytest.raises(EmulatorError, match="different threadgroup_barrier calls"):
        run(src, [mx.zeros((1,))], [(32,)])


def test_threadgroup_array_overrun_is_reported():
    src = """
    threadgroup float buf[32];
    uint t = thread_index_in_threadgroup;
    buf[t + 1] = 2.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[t] = 1.0f;
    """
    with pytest.raises(EmulatorError, match="past the end of threadgroup array 'buf'"):
        run(src, [mx.zeros((1,))], [(32,)])


def test_threadgroup_memory_over_the_apple_limit_is_reported():
    src = """
    threadgroup float big[9000];
    big[thread_index_in_threadgroup] = 1.0f;
    out[thread_index_in_threadgroup] = 1.0f;
    """
    with pytest.raises(EmulatorError, match="exceeds the 32768-byte limit"):
        run(src, [mx.zeros((1,))], [(32,)])


def test_threadgroup_over_1024_threads_is_reported():
    with pytest.raises(EmulatorError, match="1024-thread maximum"):
        run("out[0] = 1.0f;", [mx.zeros((1,))], [(1,)], grid=(2048, 1, 1), threadgroup=(2048, 1, 1))


def test_functions_metal_lacks_do_not_compile():
    with pytest.raises(EmulatorCompileError, match="log1p"):
        run("out[0] = metal::log1p(x[0]);", [mx.zeros((1,))], [(1,)], grid=(1, 1, 1), threadgroup=(1, 1, 1))


@needs_clang
def test_address_space_mistake_is_caught_by_clang_but_not_by_gxx():
    # storing a device pointer in a thread pointer compiles in plain C++ but not in Metal
    bad = "uint i = thread_position_in_grid.x; const float* row = x + i; out[i] = row[0];"
    good = "uint i = thread_position_in_grid.x; const device float* row = x + i; out[i] = row[0];"
    x = mx.arange(32).astype(mx.float32)
    (out,) = run(bad, [x], [(32,)], names=["x"], check_address_spaces=False)  # g++ alone accepts it
    np.testing.assert_array_equal(np.array(out), np.arange(32))
    with pytest.raises(EmulatorCompileError, match="address-space check"):
        run(bad, [x], [(32,)], names=["x"], check_address_spaces=True)
    run(good, [x], [(32,)], names=["x"], check_address_spaces=True)


@needs_clang
def test_constant_address_space_of_small_inputs_is_checked():
    # an input under 8 elements is `constant` in MLX's signature: a device pointer to it is an error
    bad = "const device float* p = x; out[0] = p[0];"
    sig_inputs = [mx.zeros((4,))]
    kernel = metal_kernel("t", ["x"], ["out"], bad, check_address_spaces=True)
    with pytest.raises(EmulatorCompileError):
        kernel(inputs=sig_inputs, output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(1, 1, 1), threadgroup=(1, 1, 1))
    kernel(inputs=[mx.zeros((16,))], output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(1, 1, 1),
           threadgroup=(1, 1, 1))


def test_every_attribute_mlx_declares_is_passed_with_its_value():
    from hnet_metal_kernels.emulator.signature import METAL_ATTRIBUTES

    src = """
    uint i = thread_position_in_grid.y * 70 + thread_position_in_grid.x;
    uint v[26] = {
        dispatch_quadgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup,
        dispatch_threads_per_threadgroup.x, grid_origin.x, grid_size.x, grid_size.y, quadgroup_index_in_threadgroup,
        quadgroups_per_threadgroup, simdgroup_index_in_threadgroup, simdgroups_per_threadgroup,
        thread_execution_width, thread_index_in_quadgroup, thread_index_in_simdgroup, thread_index_in_threadgroup,
        thread_position_in_grid.x, thread_position_in_threadgroup.x, thread_position_in_threadgroup.y,
        threadgroup_position_in_grid.x, threadgroup_position_in_grid.y, threadgroups_per_grid.x, threads_per_grid.x,
        threads_per_simdgroup, threads_per_threadgroup.x, threads_per_threadgroup.y, grid_origin.y, grid_origin.z};
    for (int k = 0; k < 26; ++k) out[i * 26 + k] = v[k];
    """
    assert all(attr in src for attr, _ in METAL_ATTRIBUTES)
    (out,) = run(src, [mx.zeros((1,))], [(3 * 70 * 26,)], [mx.uint32], grid=(70, 3, 1), threadgroup=(32, 2, 1))
    out = np.array(out).reshape(3, 70, 26)
    # thread (x=65, y=2): edge group (2, 1) of size 6 x 1; local (1, 0); index 1
    assert out[2, 65].tolist() == [16, 2, 32, 0, 70, 3, 0, 2, 0, 1, 32, 1, 1, 1, 65, 1, 0, 2, 1, 3, 70, 32, 6, 1, 0, 0]
    # thread (x=40, y=1): full group (1, 0); local (8, 1); index 1 * 32 + 8 = 40
    assert out[1, 40].tolist() == [16, 2, 32, 0, 70, 3, 10, 16, 1, 2, 32, 0, 8, 40, 40, 8, 1, 1, 0, 3, 70, 32, 32, 2, 0, 0]


def test_the_emulator_says_once_when_the_address_space_check_is_off(monkeypatch):
    from hnet_metal_kernels.emulator import build, launch

    monkeypatch.setattr(build, "clang", lambda: None)
    monkeypatch.setattr(build, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="address-space check is OFF: clang\\+\\+ is not installed"):
        kernel = launch.EmulatedKernel("k", ["a"], ["out"], "out[0] = a[0];")
    assert kernel.check_address_spaces is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launch.EmulatedKernel("k", ["a"], ["out"], "out[0] = a[0];")  # said once per process
