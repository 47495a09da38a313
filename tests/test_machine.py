import platform
from pathlib import Path

from metaopt._machine import cpu_model


def test_cpu_model_reads_the_first_model_name(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
        "\nprocessor\t: 1\nmodel name\t: Other\n"
    )
    assert cpu_model(info) == "Intel(R) Xeon(R) Processor"


def test_cpu_model_falls_back_without_cpuinfo(tmp_path: Path) -> None:
    expected = platform.processor() or "unknown CPU"
    assert cpu_model(tmp_path / "missing") == expected
    empty = tmp_path / "empty"
    empty.write_text("processor\t: 0\nmodel name\t:   \n")
    assert cpu_model(empty) == expected
