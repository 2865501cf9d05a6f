"""The local executor (forked map): results in job order, equal to the serial map, closures over large data,
errors raised; and the backend settings (`[backend]`, `--backend`) refused or explained in one line."""

import sys
from pathlib import Path

import numpy as np
import pytest

from vggt_sfm import cli
from vggt_sfm.config import config_from_dict, load_preset
from vggt_sfm.errors import UserError
from vggt_sfm.executor import BackendConfig, LocalExecutor, fork_map, make_executor


def test_forked_results_equal_the_serial_map_in_order():
    data = np.random.default_rng(0).normal(size=(2000, 500))  # inherited by the workers, never pickled

    def row_norm(k: int) -> float:
        return float(np.linalg.norm(data[k]))

    jobs = list(range(0, 2000, 7))
    serial = list(fork_map(row_norm, jobs, workers=1))
    forked = list(fork_map(row_norm, jobs, workers=2, chunksize=3))
    executed = list(LocalExecutor().map(row_norm, jobs, workers=2, batch_size=5))
    assert forked == serial == executed == [float(np.linalg.norm(data[k])) for k in jobs]


def test_an_error_in_a_worker_reaches_the_caller():
    def fails_on_five(k: int) -> int:
        if k == 5:
            raise ValueError("job five")
        return k

    with pytest.raises(ValueError, match="job five"):
        list(fork_map(fails_on_five, range(10), workers=2))
    with pytest.raises(ValueError, match="job five"):
        list(LocalExecutor().map(fails_on_five, range(10), workers=2))


def test_the_default_backend_is_local_and_needs_no_ray():
    assert config_from_dict({}).backend == BackendConfig(name="local")
    assert isinstance(make_executor(BackendConfig()), LocalExecutor)


def test_an_unknown_backend_is_refused_naming_the_choices():
    with pytest.raises(UserError, match="backend.name must be one of local, ray"):
        config_from_dict({"backend": {"name": "dask"}})


def test_ray_backend_without_ray_installed_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    data = Path(__file__).resolve().parents[1] / "data" / "fountain"
    code = cli.main(["reconstruct", "--images", f"{data}/images", "--predictions", f"{data}/prior_vggt_sim.npz",
                     "--output", str(tmp_path / "out"), "--backend", "ray"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "--backend ray needs Ray" in err and 'pip install -e ".[ray]"' in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_preset_can_choose_the_ray_backend(tmp_path):
    preset = tmp_path / "cluster.toml"
    preset.write_text('extends = "default"\n\n[backend]\nname = "ray"\naddress = "10.0.0.5:6379"\nbatch_size = 8\n')
    config = load_preset(preset)
    assert config.backend == BackendConfig(name="ray", address="10.0.0.5:6379", batch_size=8)
    assert config.features.extractor == "sift"  # the rest is the default preset's
