"""Every call in every emitted kernel is in its target's API manifest with an overload
that takes its arguments (hw_targets/manifest.py; docs/TARGETS.md, "API manifests").

The kernels are those ``qmpass lower`` emits for the four fixture models and the shapes
of tests/test_hw_targets.py, emitted but not simulated (the check reads source text).
Calls the manifests do not allow are reported one per kind, with the kernel and line;
``KNOWN_VIOLATIONS`` lists those today's kernels still make, each with why it is not the
vendor's API. It must shrink to empty as the kernels move to the real API: a listed
violation that no kernel makes any more fails the test too, so the list stays exact.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import onnx
import pytest
from conftest import fixture_path

import hw_targets
import models
from hw_targets.manifest import (
    Manifest,
    Violation,
    check_source,
    load_manifest,
    main,
    parse_signature,
)
from qmpass import lower as qlower
from qmpass.extract import extract_operators
from qmpass.extract.shapes import infer_types
from qmpass.modelio import load_model

#: today's non-API calls, per target: "callee(arguments)" -> why it is not the vendor API
KNOWN_VIOLATIONS: dict[str, dict[str, str]] = {
    "ascend": {},
    "mlu": {},
    "kunlunxin": {},
    "cpu": {},
}
#: rows x k x n and bias; input NCHW, output channels, kernel, strides, pads, groups
MATMULS = [(64, 64, 128, True), (5, 7, 3, False), (33, 100, 70, True), (96, 128, 192, False)]
CONVS = [((2, 4, 9, 9), 6, 3, (1, 1), (1, 1, 1, 1), 1),
         ((1, 8, 8, 8), 8, 3, (2, 2), (1, 0, 1, 0), 8),
         ((2, 6, 5, 5), 4, 1, (1, 1), (0, 0, 0, 0), 2)]


@functools.cache
def _fixture_operators(name: str) -> tuple[list, dict]:  # type: ignore[type-arg]
    """The fixture's lowerable operators and their captured input tensors, as
    ``qmpass lower`` finds them (its own helpers, so the shapes are the same)."""
    loaded = load_model(fixture_path(name))
    proto = loaded.proto
    operators = extract_operators(proto, loaded.external).operators
    types = infer_types(proto, [op.input for op in operators])
    lowerable = [op for op in operators
                 if qlower._declines(op, types.get(op.input, onnx.TensorProto.FLOAT)) is None]
    return lowerable, qlower._capture(proto, qlower.LowerConfig("cpu"), lowerable)


def _kernels(target: str) -> list[hw_targets.KernelSource]:
    module = hw_targets.get_target(target)
    lowerings = []
    for fixture in models.FIXTURES:
        operators, tensors = _fixture_operators(fixture)
        for index, op in enumerate(operators):
            name = qlower._kernel_name(index, op.name)
            lowerings.append(qlower._lowering(module, module.TARGET, f"{fixture}_{name}", op,
                                              tensors[op.input])[0])
    for index, (rows, k, n, bias) in enumerate(MATMULS):
        lowerings.append(hw_targets.lower_matmul(module, module.TARGET, f"mm{index}", rows, k,
                                                 n, bias))
    for index, (shape, c_out, k, strides, pads, groups) in enumerate(CONVS):
        lowerings.append(hw_targets.lower_conv(module, module.TARGET, f"cv{index}", shape,
                                               c_out, (k, k), strides, pads, groups=groups))
    return [launch.kernel for lowering in lowerings for launch in lowering.launches]


def _key(violation: Violation) -> str:
    """``name(n)`` (``.name(n)`` for a method), with the arguments' manifest classes
    when the kernel declares any (``?`` for the others)."""
    call = violation.call
    callee = f"{call.qualifier}::{call.name}" if call.qualifier else call.name
    args = ", ".join(k or "?" for k in violation.kinds) if any(violation.kinds) \
        else str(len(call.args))
    return f"{'.' if call.receiver is not None else ''}{callee}({args})"


@pytest.mark.parametrize("target", hw_targets.TARGET_NAMES)
def test_every_emitted_call_is_in_the_manifest(target: str) -> None:
    manifest = load_manifest(target)
    found: dict[str, str] = {}
    kernels = _kernels(target)
    assert len(kernels) > 40  # every fixture's kernels and the unit shapes
    for kernel in kernels:
        for violation in check_source(kernel.code, manifest):
            found.setdefault(_key(violation), f"{kernel.name}: {violation}")
    known = KNOWN_VIOLATIONS[target]
    new = {key: where for key, where in found.items() if key not in known}
    gone = sorted(set(known) - set(found))
    assert not new, "calls outside the manifest:\n" + "\n".join(new.values())
    assert not gone, f"no kernel makes these any more; remove them from KNOWN_VIOLATIONS: {gone}"


@pytest.mark.parametrize("target", hw_targets.TARGET_NAMES)
def test_every_overload_has_a_source_and_a_parsable_signature(target: str) -> None:
    manifest = load_manifest(target)
    callables = [e for e in manifest.entries if e.kind in ("intrinsic", "method")]
    assert callables
    for entry in manifest.entries:
        for overload in entry.overloads:
            assert overload.source and overload.signature, entry.name
            if entry.kind in ("intrinsic", "method"):
                assert overload.max_args is None or overload.max_args >= overload.min_args
    assert all(e.overloads for e in callables)


def _names(manifest: Manifest) -> set[str]:
    return {e.name if e.cls is None else f"{e.cls}.{e.name}" for e in manifest.entries}


def test_the_manifests_hold_each_generation_s_api_and_not_the_others() -> None:
    ascend, mlu, kunlun = (load_manifest(t) for t in ("ascend", "mlu", "kunlunxin"))
    assert {"Fixpipe", "Mmad", "LoadData", "DataCopyPad", "SetFlag", "WaitFlag",
            "PipeBarrier", "CrossCoreSetFlag", "GetBlockIdx", "TQue.EnQue", "TQue.DeQue",
            "TPipe.InitBuffer", "GlobalTensor.SetGlobalBuffer"} <= _names(ascend)
    fixpipe = [o.signature for e in ascend.callables("Fixpipe") for o in e.overloads]
    assert fixpipe and all("FixpipeParamsV220" in s for s in fixpipe)  # A2's only form
    datacopy = [o.signature for e in ascend.callables("DataCopy") for o in e.overloads]
    assert not any("DataCopyEnhancedParams" in s for s in datacopy)  # L0C->UB: 310P only
    assert {"__memcpy_async", "__bang_reshape_filter", "__bang_conv", "__sync_move",
            "__sync_io", "__sync_cluster", "__nram__", "__wram__", "taskId"} <= _names(mlu)
    assert {"GM2LM_ASYNC", "LM2GM_ASYNC", "mfence", "core_id", "cluster_num",
            "vload_lm_float32x16", "svmac_float32x16", "__global_ptr__", "__local__"} \
        <= _names(kunlun)
    assert not any(re.search(r"(?<!b)float16x32", name) for name in _names(kunlun))  # XPU3's
    assert "SM2LM" not in _names(kunlun)  # Kunlun 1 only


ASCEND_SNIPPET = """
class KernelX {
 public:
  __aicore__ inline void Init(GM_ADDR x) {
    xGM.SetGlobalBuffer((__gm__ half*)x, 64);
    pipe.InitBuffer(inQueue, 2, 64 * sizeof(half));
  }
  __aicore__ inline void Step(int32_t n) {
    LocalTensor<half> t = inQueue.AllocTensor<half>();
    DataCopy(t, xGM[n], 64);       // GM -> UB
    DataCopy(xGM, t, 64, 1, 2, 3); // no overload takes 6 arguments
    DataCopyPad(t, xGM, t);        // a LocalTensor where DataCopyExtParams goes
    Helper(t);                     // the kernel's own function
    xGM.SetL2Reuse(3);             // not a GlobalTensor method
    if (Fractals(n) > 0) { inQueue.EnQue(t); }
  }
  __aicore__ inline int32_t Fractals(int32_t v) { return (v + 15) / 16; }
  __aicore__ inline void Helper(LocalTensor<half>& t) { Duplicate(t, (half)0, 16); }
  TPipe pipe;
  TQue<QuePosition::VECIN, 2> inQueue;
  GlobalTensor<half> xGM;
};
"""


def test_the_checker_reports_unknown_names_arities_and_argument_classes() -> None:
    violations = check_source(ASCEND_SNIPPET, load_manifest("ascend"))
    by_line = {v.call.line: str(v) for v in violations}
    assert sorted(by_line) == [11, 12, 14], by_line
    assert "6 argument(s)" in by_line[11]
    assert "'LocalTensor'" in by_line[12] and "DataCopyExtParams" in by_line[12]
    assert "not a method of GlobalTensor" in by_line[14]


def test_signatures_give_the_numbers_of_arguments() -> None:
    assert parse_signature("template <typename T> __aicore__ inline void DataCopy("
                           "const LocalTensor<T>& dst, const GlobalTensor<T>& src, "
                           "const SliceInfo dstSliceInfo[], const SliceInfo srcSliceInfo[], "
                           "const uint32_t dimValue = 1)", "DataCopy")[:2] == (4, 5)
    assert parse_signature("template <class T, class U, class V, class... Addrs> __aicore__ "
                           "inline bool InitBuffer(T& que, const Std::tuple<U, V>& addr0, "
                           "const Addrs&... addrs)", "InitBuffer")[:2] == (2, None)
    assert parse_signature("void mfence()", "mfence")[:2] == (0, 0)
    with pytest.raises(ValueError, match="does not declare"):
        parse_signature("int core_id()", "cluster_id")


def test_the_command_line_checks_files_and_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = tmp_path / "k.cc"
    kernel.write_text("__global__ void k(float* x) {\n  lm_malloc<float>(4, \"a\");\n"
                      "  mfence();\n}\n")
    assert main(["kunlunxin", str(kernel)]) == 1
    assert "k.cc:line 2: lm_malloc(2 args): not a function" in capsys.readouterr().out
    assert main(["nosuchchip", str(kernel)]) == 2
    assert main(["cpu", str(tmp_path / "missing.cc")]) == 2
    err = capsys.readouterr().err
    assert "no manifest for target 'nosuchchip'" in err and "no such kernel file" in err


#: kernels written with each generation's real API (the shapes of the calls the emitters
#: are moving to): the checker must find nothing to report in them
REAL_API = {
    "ascend": """
namespace mm {
using namespace AscendC;
__aicore__ inline void Helper(LocalTensor<half>& x) { Muls(x, x, (half)2, 16); }
extern "C" __global__ __aicore__ void mm_custom(GM_ADDR a, GM_ADDR b, GM_ADDR c) {
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
  TPipe pipe;
  TQue<QuePosition::CO1, 1> co1;
  TQue<QuePosition::A1, 1> a1q;
  TBuf<TPosition::VECCALC> tmp;
  GlobalTensor<float> cGM;
  cGM.SetGlobalBuffer((__gm__ float*)c, 1024);
  pipe.InitBuffer(co1, 1, 4096);
  pipe.InitBuffer(tmp, 4096);
  if ASCEND_IS_AIC {
    LocalTensor<float> c1Local = co1.DeQue<float>();
    FixpipeParamsV220 fp;
    fp.nSize = 16;
    Fixpipe(cGM[0], c1Local, fp);
    Fixpipe<float, float, CFG_ROW_MAJOR>(cGM, c1Local, fp);
    co1.FreeTensor(c1Local);
    CrossCoreSetFlag<0x2, PIPE_FIX>(3);
    LocalTensor<half> a1 = a1q.AllocTensor<half>();
    LocalTensor<half> a2 = tmp.Get<half>();
    SetFmatrix(8, 8, padList, FmatrixMode::FMATRIX_LEFT);
    LoadData(a2, a1, LoadData3DParamsV2<half>());
    Mmad(c1Local, a2, a2, MmadParams(16, 16, 16, 0, false, true));
  }
  if ASCEND_IS_AIV {
    CrossCoreWaitFlag(3);
    event_t e = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::MTE2_V));
    SetFlag<HardEvent::MTE2_V>(e);
    WaitFlag<HardEvent::MTE2_V>(e);
    PipeBarrier<PIPE_V>();
    LocalTensor<half> x = tmp.Get<half>();
    Helper(x);
    AscendC::Adds(x, x, (half)1, 16);
    uint32_t idx = GetBlockIdx() / GetSubBlockNum() + AscendC::Std::min(1, 2);
    DataCopyPad(cGM, x.ReinterpretCast<float>(), DataCopyExtParams{1, 32, 0, 0, 0});
  }
}
}
""",
    "mlu": """
namespace k {
__nram__ int8_t nram_buffer[MAX_NRAM_SIZE];
__wram__ int8_t wram_buffer[MAX_WRAM_SIZE];
__mlu_shared__ int8_t sram_buffer[MAX_SRAM_SIZE];
__mlu_func__ void load(half* dst, half* src, int n) { __memcpy_async(dst, src, n * 2, GDRAM2NRAM); }
__mlu_global__ void kernel(half* a, half* b, float* c) {
  half* an = (half*)nram_buffer;
  half* bw = (half*)wram_buffer;
  if (coreId == 0) { __memcpy(sram_buffer, b, 1024, GDRAM2SRAM); }
  __sync_cluster();
  __memcpy_async(an, (half*)sram_buffer, 1024, SRAM2NRAM);
  __bang_reshape_filter(an + 512, an, 16, 1, 1, 32);
  __memcpy(bw, an + 512, 1024, NRAM2WRAM);
  __sync_move();
  load(an, a + taskId * 64, 64);
  __sync_io();
  __bang_conv((float*)an, an, bw, 32, 1, 16, 1, 1, 1, 1, 16, 0);
  __sync_compute();
  __memcpy_async(c + taskId * 16, an, 64, NRAM2GDRAM, 64, 64, 0);
  __bang_cycle_add((float*)an, (float*)an, (float*)an, 256, 16);
  __sync_all();
}
}
""",
    "kunlunxin": """
namespace k {
static __device__ void add_bias(__local__ float* c, __global_ptr__ const float* bias, int n) {
  __simd__ __local__ float lb[64];
  GM2LM_ASYNC(bias, lb, n * (int)sizeof(float));
  mfence();
  for (int i = 0; i < n; i += 16) {
    float32x16_t v = vload_lm_float32x16(c + i);
    v = vvadd_float32x16(v, vload_lm_float32x16(lb + i));
    vstore_lm_float32x16(c + i, v);
  }
  mfence_lm();
}
__global__ void kernel(const float16* a, const float* bias, float* c) {
  int cid = cluster_id() * core_num() + core_id();
  __simd__ __local__ float16 la[128];
  __simd__ __local__ float lc[64];
  __shared__ float sm[256];
  GM2LM(a + cid * 128, la, 128 * (int)sizeof(float16));
  int16x32_t h = vload_lm_int16x32(la);
  float32x16_t acc = svmac_float32x16(1.0f, vload_lm_float32x16(lc), vload_lm_float32x16(lc));
  vstore_lm_float32x16_mz(lc, acc, 0xffff);
  add_bias(lc, bias, 64);
  GM2SM(bias, sm, 1024);
  sync_cluster();
  LM2GM_ASYNC(lc, c + cid * 64, 64 * (int)sizeof(float));
  mfence();
  int x = min(roundup_div(cid, 4), cluster_num());
}
}
""",
}


@pytest.mark.parametrize("target", sorted(REAL_API))
def test_kernels_written_with_the_real_api_pass(target: str) -> None:
    manifest = load_manifest(target)
    assert [str(v) for v in check_source(REAL_API[target], manifest)] == []
    # and the same kernel with one call's arguments changed does not
    old, new = {"ascend": ("(half)1, 16)", "(half)1)"), "mlu": ("256, 16)", "256)"),
                "kunlunxin": ("int16x32(la)", "int16x32(la, 0, 1)")}[target]
    assert old in REAL_API[target]
    assert len(check_source(REAL_API[target].replace(old, new), manifest)) == 1


def test_namespaces_the_vendor_names_are_dropped_and_others_kept() -> None:
    code = "void f(int a, int b) { int x = AscendC::Std::min(a, b) + std::min(a, b); }"
    violations = check_source(code, load_manifest("ascend"))
    assert [v.call.display() for v in violations] == ["std::min(2 args)"]


def test_constructions_of_manifest_classes_are_checked_and_the_kernel_s_own_are_not() -> None:
    code = """void f(GlobalTensor<float> g, LocalTensor<float> x) {
      DataCopyPad(g, x, DataCopyExtParams{1, 2});
      MmadParams mp(1, 2);
      DataCopyParams dp{1, 2, 3, 4};
      Step st{1, 2};
      Step other(3);
    }"""
    violations = check_source(code, load_manifest("ascend"))
    assert [(v.call.line, v.call.display()) for v in violations] == [
        (2, "DataCopyExtParams(2 args)"), (3, "MmadParams(2 args)")]
