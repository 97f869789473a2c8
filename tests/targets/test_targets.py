"""Device profiles: the registry, host detection (this machine and described ones), `sparsedge
targets`, and `sparsedge export --target` end to end on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path

import pytest

from sparsedge import SparsedgeError
from sparsedge.cli import main
from sparsedge.export import artifact
from sparsedge.export.artifact import FORMATS
from sparsedge.runtimes import RUNTIMES
from sparsedge.targets import TARGETS, Host, detect_host, export_config, get_target, status
from sparsedge.targets import host as host_mod
from tiny import save_folder


def _cpuinfo_flags() -> set[str]:
    """Read independently of host.py, so that a detection bug cannot agree with itself."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


AVX2_HOST = platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= _cpuinfo_flags()
needs_avx2_host = pytest.mark.skipif(not AVX2_HOST, reason="expectations written for an x86-64 AVX2+FMA Linux host")
NPU_IN_BUILD = "npu" in FORMATS and "npu" in RUNTIMES


def _host(**kw) -> Host:
    """A described host: by default an x86-64 AVX2 Linux box with every runtime and EP installed."""
    base = dict(system="linux", machine="x86_64", cpu_features=["avx2", "fma"],
                providers=["CPUExecutionProvider", "QNNExecutionProvider", "OpenVINOExecutionProvider"],
                plugin_eps={}, runtimes={"torch": "installed", "llamacpp": "installed", "onnxruntime": "installed",
                                         "native": "avx2+fma", "npu": "installed"},
                build_runtimes=["torch", "llamacpp", "onnxruntime", "native", "npu"],
                build_formats=["gguf", "onnx", "npu"])
    return Host(**{**base, **kw})


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_folder("llama", tmp_path_factory.mktemp("tiny") / "llama")


# --- the registry -------------------------------------------------------------------------------

def test_unknown_target_fails_with_the_known_names():
    with pytest.raises(SparsedgeError) as e:
        get_target("pixel-tpu")
    msg = str(e.value)
    assert "unknown target 'pixel-tpu'" in msg and all(name in msg for name in TARGETS)


def test_profiles_are_consistent_data():
    from sparsedge.quantize.gguf import check_quant
    from sparsedge.quantize.onnx import check_kind

    assert set(TARGETS) == {"laptop-x86", "arm64-phone", "qualcomm-npu", "intel-npu", "apple"}
    for name, p in TARGETS.items():
        assert p.name == name and p.formats and p.runtime == p.runtimes[0]
        assert set(p.formats) <= set(FORMATS) | {"npu"}  # npu: the format another change brings
        assert bool(p.gguf_quants) == ("gguf" in p.formats) and bool(p.onnx_quants) == ("onnx" in p.formats or "npu" in p.formats)
        for q in p.gguf_quants:
            check_quant(q)
        for k in p.onnx_quants:
            if k != "fp32":
                check_kind(k)
        for r in p.requires:
            assert r.kind in ("runtime", "provider") and r.install
            if r.kind == "runtime":
                assert r.name in set(RUNTIMES) | {"npu"}
        assert p.tree_budget >= 1 and p.context > 0
        json.dumps(p.to_dict())  # serialisable: it goes into manifests
    npu = TARGETS["qualcomm-npu"]
    assert npu.static_shapes and npu.context == 512 and npu.verify_tokens == 8
    assert (npu.activation_type, npu.weight_type) == ("uint16", "uint8") and npu.runtime == "npu"
    assert npu.tree_budget == npu.verify_tokens - 1  # the verify graph holds the last token + the drafts
    assert "onnxruntime-qnn" in npu.packages and "QNNExecutionProvider" in npu.providers
    assert TARGETS["arm64-phone"].threads == 4 and TARGETS["arm64-phone"].gguf_quants == ("q4_0",)
    assert TARGETS["laptop-x86"].gguf_quants == ("q4_0", "q8_0") and TARGETS["laptop-x86"].onnx_quants == ("int4",)
    assert "onnxruntime-ep-openvino" in TARGETS["intel-npu"].packages


# --- status on described hosts -------------------------------------------------------------------

def test_status_on_described_hosts():
    x86 = _host()
    assert status(TARGETS["laptop-x86"], x86).code == "runs"
    assert status(TARGETS["arm64-phone"], x86).code == "wrong-cpu"
    assert status(TARGETS["qualcomm-npu"], x86).code == "emulated"  # the HTP backend is an emulator on x86
    assert status(TARGETS["intel-npu"], x86).code == "runs"
    st = status(TARGETS["laptop-x86"], _host(cpu_features=["sse4_2"]))
    assert st.code == "wrong-cpu" and "without avx2, fma" in st.text
    # features unknown (an OS we cannot read them on): not held against the profile
    assert status(TARGETS["laptop-x86"], _host(cpu_features=None)).code == "runs"

    phone = _host(machine="arm64", cpu_features=["neon"], runtimes={"native": "neon"})
    assert status(TARGETS["arm64-phone"], phone).code == "runs"
    assert status(TARGETS["laptop-x86"], phone).code == "wrong-cpu"
    assert status(TARGETS["apple"], phone).code == "wrong-os"
    snapdragon = _host(machine="arm64", cpu_features=["neon"])
    assert status(TARGETS["qualcomm-npu"], snapdragon).code == "runs"  # real HTP: not emulated
    mac = _host(system="darwin", machine="arm64", cpu_features=["neon"])
    assert status(TARGETS["apple"], mac).code == "runs"
    assert status(TARGETS["apple"], dataclasses.replace(mac, runtimes={"native": "neon"})).text == (
        "missing the llama.cpp runtime (install with `pip install llama-cpp-python`)")


def test_status_says_what_to_install_and_what_this_build_lacks():
    no_qnn = _host(providers=["CPUExecutionProvider"])
    st = status(TARGETS["qualcomm-npu"], no_qnn)
    assert st.code == "missing" and not st.runs and "`pip install onnxruntime-qnn`" in st.text
    st = status(TARGETS["intel-npu"], no_qnn)
    assert st.code == "missing" and "`pip install onnxruntime-ep-openvino`" in st.text
    old_build = _host(build_formats=["gguf", "onnx"], build_runtimes=["torch", "native"])
    st = status(TARGETS["qualcomm-npu"], old_build)
    assert st.code == "not-in-build" and "npu export format" in st.text


# --- this machine ---------------------------------------------------------------------------------

@needs_avx2_host
def test_detect_this_host():
    h = detect_host()
    assert h.system == "linux" and h.machine == "x86_64" and {"avx2", "fma"} <= set(h.cpu_features)
    # the AVX2 path, with the VNNI products where the CPU has AVX512-VNNI
    assert "CPUExecutionProvider" in h.providers and h.runtimes.get("native") in ("avx2+fma", "avx2+fma+avx512vnni")
    assert h.runtimes["native"].endswith("avx512vnni") == ("avx512_vnni" in h.cpu_features)
    assert status(TARGETS["laptop-x86"], h).code == "runs"
    assert status(TARGETS["arm64-phone"], h).code == "wrong-cpu"
    assert status(TARGETS["apple"], h).code == "wrong-cpu"
    if "OpenVINOExecutionProvider" not in h.providers:
        assert status(TARGETS["intel-npu"], h).code == "missing"


@needs_avx2_host
def test_qnn_plugin_is_detected_and_emulated_here():
    pytest.importorskip("onnxruntime_qnn")
    h = detect_host()
    assert "QNNExecutionProvider" in h.providers and Path(h.plugin_eps["QNNExecutionProvider"]).is_file()
    st = status(TARGETS["qualcomm-npu"], h)
    if NPU_IN_BUILD:
        assert st.code == "emulated" and st.runs and "QNNExecutionProvider on x86_64" in st.text
    else:  # until the npu format and runtime land
        assert st.code == "not-in-build"


def test_detection_follows_what_imports():
    real = host_mod._importable
    h = detect_host(importable=lambda m: m not in ("llama_cpp", "onnxruntime_qnn", "sparsedge.runtimes.native") and real(m))
    assert "llamacpp" not in h.runtimes and "native" not in h.runtimes and "torch" in h.runtimes
    assert "QNNExecutionProvider" not in h.plugin_eps
    assert status(TARGETS["laptop-x86"], h).code in ("missing", "wrong-cpu")


# --- export configs -------------------------------------------------------------------------------

def test_export_config_applies_the_profile_and_given_flags_override():
    cfg = export_config("laptop-x86", _host())
    assert (cfg.formats, cfg.gguf_quants, cfg.onnx_quants) == (("gguf", "onnx"), ("q4_0", "q8_0"), ("int4",))
    assert cfg.target == "laptop-x86" and cfg.extra["target_profile"]["name"] == "laptop-x86"
    assert cfg.extra["target_profile"]["overridden"] == []
    cfg = export_config("laptop-x86", _host(), formats=("gguf",), gguf_quants=("f16",))
    assert (cfg.formats, cfg.gguf_quants) == (("gguf",), ("f16",))
    assert cfg.extra["target_profile"]["overridden"] == ["formats", "gguf_quants"]
    cfg = export_config("intel-npu", _host(), formats=("gguf",))  # a profile without GGUF quants
    assert cfg.gguf_quants == ("q4_0",)
    # another CPU is fine: exporting for a phone on a laptop
    assert export_config("arm64-phone", _host()).formats == ("gguf",)


def test_export_config_errors():
    with pytest.raises(SparsedgeError, match="unknown target 'nope'"):
        export_config("nope", _host())
    with pytest.raises(SparsedgeError, match=r"^target intel-npu needs the OpenVINO execution provider: "
                                             r"pip install onnxruntime-ep-openvino$"):
        export_config("intel-npu", _host(providers=["CPUExecutionProvider"]))
    # the QNN EP missing (the format overridden, so this holds whether or not the npu format is built)
    with pytest.raises(SparsedgeError, match=r"^target qualcomm-npu needs the QNN execution provider: "
                                             r"pip install onnxruntime-qnn$"):
        export_config("qualcomm-npu", _host(providers=["CPUExecutionProvider"]), formats=("onnx",), onnx_quants=("qdq",))
    with pytest.raises(SparsedgeError, match="needs the llama.cpp runtime: pip install llama-cpp-python"):
        export_config("apple", _host(runtimes={"native": "avx2+fma"}))
    with pytest.raises(SparsedgeError, match="runs on the npu runtime, not available in this build"):
        export_config("qualcomm-npu", _host(build_runtimes=["torch"]), formats=("onnx",))


def test_npu_format_missing_from_the_build_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(artifact, "FORMATS", ("gguf", "onnx"))
    with pytest.raises(SparsedgeError, match="target qualcomm-npu exports the npu format, not available in this build"):
        export_config("qualcomm-npu", _host())
    code, out, err = _run(capsys, "export", "/no/such/model", "-o", "/tmp/never", "--target", "qualcomm-npu")
    assert code == 1 and out == "" and err.count("\n") == 1 and "not available in this build" in err


@pytest.mark.skipif("npu" not in FORMATS, reason="the npu export format is not in this build yet")
def test_qualcomm_npu_export_config_carries_the_static_shapes():
    cfg = export_config("qualcomm-npu", _host())
    assert cfg.formats == ("npu",)
    assert (cfg.npu_context, cfg.npu_verify_tokens) == (512, 8)
    assert (cfg.npu_activation_type, cfg.npu_weight_type) == ("uint16", "uint8")


# --- the CLI --------------------------------------------------------------------------------------

def test_targets_json(capsys):
    code, out, err = _run(capsys, "targets", "--json")
    assert code == 0 and out.count("\n") == 1
    obj = json.loads(out)
    assert list(obj["targets"]) == list(TARGETS)
    assert {"system", "machine", "cpu_features", "providers", "runtimes"} <= set(obj["host"])
    for t in obj["targets"].values():
        assert t["status"] in ("runs", "emulated", "missing", "not-in-build", "wrong-cpu", "wrong-os")
        assert t["status_text"] and "formats" in t and "packages" in t
    if AVX2_HOST:
        assert obj["targets"]["laptop-x86"]["status"] == "runs"
        assert obj["targets"]["arm64-phone"]["status"] == "wrong-cpu"


def test_targets_table(capsys):
    code, out, _ = _run(capsys, "targets")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("host: ") and lines[2].split()[:2] == ["target", "artifact"]
    assert [ln.split()[0] for ln in lines[3:]] == list(TARGETS)


@pytest.mark.parametrize("target, hidden, message", [
    ("nope", None, "unknown target 'nope' (known: laptop-x86, arm64-phone, qualcomm-npu, intel-npu, apple)"),
    ("apple", "llama_cpp", "target apple needs the llama.cpp runtime: pip install llama-cpp-python"),
    ("laptop-x86", "sparsedge.runtimes.native", "target laptop-x86 needs the native runtime"),
])
def test_export_target_errors_are_one_line_before_loading(capsys, monkeypatch, target, hidden, message):
    """The model path does not exist: the target is checked first, so its error is the one shown."""
    if hidden:  # the host as detection sees it: one module not installed
        real = host_mod._importable
        monkeypatch.setattr(host_mod, "_importable", lambda m: m != hidden and real(m))
    code, out, err = _run(capsys, "export", "/no/such/model", "-o", "/tmp/never", "--target", target)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("sparsedge: error: ") and message in err


@needs_avx2_host
def test_export_target_laptop_x86_end_to_end(capsys, tiny_folder, tmp_path):
    out_dir = tmp_path / "art"
    code, out, err = _run(capsys, "export", tiny_folder, "-o", out_dir, "--target", "laptop-x86", "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["target"] == "laptop-x86" and m["target_profile"]["name"] == "laptop-x86"
    assert m["gguf_quants"] == ["q4_0", "q8_0"] and m["onnx_quants"] == ["int4"]
    assert {"model.q4_0.gguf", "model.q8_0.gguf", "onnx/model.int4.onnx"} <= set(m["files"])
    assert json.loads((out_dir / "manifest.json").read_text())["target_profile"]["runtime"] == "native"

    code, out, _ = _run(capsys, "inspect", out_dir)
    assert code == 0 and "  target: laptop-x86 (gguf q4_0,q8_0 + onnx int4; runtime native" in out

    # run without --runtime: the profile's runtime (native) and tree budget; --runtime still wins
    code, out, _ = _run(capsys, "run", out_dir, "-p", "def f(x):", "-n", "6", "--json")
    assert code == 0 and json.loads(out)["runtime"] == "native"
    code, out, _ = _run(capsys, "run", out_dir, "-p", "def f(x):", "-n", "6", "--decode", "tree",
                        "--drafter", "ngram", "--json")
    assert code == 0 and json.loads(out)["runtime"] == "native"
    code, out, _ = _run(capsys, "run", out_dir, "-p", "def f(x):", "-n", "6", "--runtime", "llamacpp", "--json")
    assert code == 0 and json.loads(out)["runtime"] == "llamacpp"


def test_export_target_flags_override_and_cross_export(capsys, tiny_folder, tmp_path):
    # arm64-phone on any host: exported with a note when the CPU differs, GGUF only, flags win
    out_dir = tmp_path / "phone"
    code, out, err = _run(capsys, "export", tiny_folder, "-o", out_dir, "--target", "arm64-phone",
                          "--gguf-quant", "q8_0", "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["target"] == "arm64-phone" and m["gguf_quants"] == ["q8_0"] and m["onnx_quants"] == []
    assert m["target_profile"]["overridden"] == ["gguf_quants"] and m["target_profile"]["threads"] == 4
    assert not any(f.startswith("onnx/") for f in m["files"])
    if AVX2_HOST:
        assert "note: target arm64-phone does not run on this host" in err


def test_export_without_target_keeps_its_defaults(capsys, tiny_folder, tmp_path):
    code, out, err = _run(capsys, "export", tiny_folder, "-o", tmp_path / "a", "--formats", "gguf", "--json")
    m = json.loads(out)
    assert code == 0 and m["target"] is None and m["target_profile"] is None and m["gguf_quants"] == ["q4_0"]
    code, out, _ = _run(capsys, "run", tmp_path / "a", "-p", "x", "-n", "2", "--json")
    assert code == 0 and json.loads(out)["runtime"] == "torch"  # no profile: the reference, as before


@pytest.mark.skipif("npu" not in FORMATS, reason="the npu export format is not in this build yet")
def test_export_target_qualcomm_npu(capsys, tiny_folder, tmp_path):
    h = detect_host()
    if not status(TARGETS["qualcomm-npu"], h).runs:
        pytest.skip(f"qualcomm-npu does not run here: {status(TARGETS['qualcomm-npu'], h).text}")
    out_dir = tmp_path / "npu"
    code, out, err = _run(capsys, "export", tiny_folder, "-o", out_dir, "--target", "qualcomm-npu", "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["target"] == "qualcomm-npu"
    p = m["target_profile"]
    assert p["static_shapes"] and (p["context"], p["verify_tokens"]) == (512, 8) and p["runtime"] == "npu"
    assert any(f.endswith(".onnx") for f in m["files"])
    code, out, _ = _run(capsys, "inspect", out_dir)
    assert code == 0 and "target: qualcomm-npu (npu qdq a:uint16 w:uint8; runtime npu (QNN)" in out


def test_host_target_is_this_machines_own_profile():
    from sparsedge.targets import host_target

    assert host_target(_host()).name == "laptop-x86"  # x86 with AVX2+FMA: not the emulated NPU
    with pytest.raises(SparsedgeError, match="no device profile runs on this host"):
        host_target(_host(machine="riscv64", cpu_features=[]))
