"""The hardware catalogue: required entries, unit conversions, user TOML extensions."""

import pytest

from moeforge.errors import ConfigError
from moeforge.plan.catalog import CATALOG, get_hardware, load_catalog


def test_catalogue_has_the_devices_the_issue_lists():
    for name in ("a100", "h100", "h800", "h20", "h200", "b200", "gb200-nvl72"):
        hw = CATALOG[name]
        assert hw.bf16_tflops > 0 and hw.hbm_gb > 0 and hw.nvlink_gbps > 0 and hw.gpus_per_node >= 8


def test_units_match_the_papers_figures():
    h800 = get_hardware("h800")
    assert h800.nic_bw_per_gpu == pytest.approx(50e9)  # 400 Gb/s IB per GPU (Insights, Sec. 4)
    assert h800.nvlink_bw * 2 == pytest.approx(400e9)  # 400 GB/s bidirectional
    assert get_hardware("gb200").nvlink_bw == pytest.approx(900e9)  # Insights, Sec. 2.3.2
    assert get_hardware("a100").matmul_flops("fp8") == get_hardware("a100").matmul_flops("bf16")  # no FP8 cores
    assert get_hardware("H100").matmul_flops("fp8") == pytest.approx(2 * get_hardware("h100").peak_flops, rel=0.01)


def test_user_toml_adds_and_overrides(tmp_path):
    f = tmp_path / "hw.toml"
    f.write_text('[hardware.h800-roce]\nbase = "h800"\nnic_latency_us = 3.6\n\n'
                 '[hardware.toy]\nbf16_tflops = 10\nfp8_tflops = 0\nhbm_gb = 16\nhbm_tbps = 0.5\n'
                 'nvlink_gbps = 25\ngpus_per_node = 4\nnics_per_node = 1\nnic_gbits = 100\npcie_gbps = 16\n')
    extra = load_catalog(f)
    assert get_hardware("h800-roce", extra).nic_latency_us == 3.6
    assert get_hardware("h800-roce", extra).bf16_tflops == CATALOG["h800"].bf16_tflops
    assert get_hardware("toy", extra).nic_bw_per_gpu == pytest.approx(100e9 / 8 / 4)


def test_bad_entries_are_one_line_errors(tmp_path):
    f = tmp_path / "hw.toml"
    f.write_text('[hardware.x]\nbase = "h100"\nflops = 3\n')
    with pytest.raises(ConfigError, match="unknown field"):
        load_catalog(f)
    f.write_text('[hardware.x]\nhbm_gb = 3\n')
    with pytest.raises(ConfigError, match="needs"):
        load_catalog(f)
    with pytest.raises(ConfigError, match="choose one of: a100, h100"):
        get_hardware("h900")
