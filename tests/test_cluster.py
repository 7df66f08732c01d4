"""dconv.cluster: ClusterOptions validation, the local cluster layout, and reaching a scheduler."""

from __future__ import annotations

import time

import pytest

from dconv import InputError
from dconv.cluster import ClusterOptions, available_cores, connect, local_cluster_layout

from conftest import free_port


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2"])
def test_workers_must_be_a_positive_int(workers):
    with pytest.raises(InputError, match="workers must be an int >= 1"):
        ClusterOptions(workers=workers)


def test_workers_and_scheduler_exclude_each_other():
    with pytest.raises(InputError, match="either workers .* or scheduler"):
        ClusterOptions(workers=2, scheduler="tcp://127.0.0.1:8786")


def test_layout_uses_every_core_once():
    cores = available_cores()
    n_workers, blas = local_cluster_layout(None)
    assert (n_workers, blas) == (cores, 1)
    for workers in (1, 2, 3, cores):
        n_workers, blas = local_cluster_layout(workers)
        assert n_workers == workers and blas == max(1, cores // workers)
        assert n_workers * blas <= max(cores, workers)


def test_no_tls_means_no_security():
    assert ClusterOptions(scheduler="tcp://127.0.0.1:8786").security() is None


def test_connect_to_nothing_fails_within_the_timeout():
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(InputError, match=f"Dask scheduler.* at '{address}'"):
        with connect(ClusterOptions(scheduler=address, connect_timeout=0.5), quiet=True):
            pass
    assert time.monotonic() - start < 8


@pytest.mark.cluster
def test_the_dashboard_link_serves_the_dashboard():
    """The link dconv prints answers with the dashboard itself, not distributed's "Dask needs bokeh" page."""
    from urllib.request import urlopen

    with connect(ClusterOptions(workers=1), quiet=True) as client:
        link = client.dashboard_link
        assert link.startswith("http://127.0.0.1:"), link
        with urlopen(link, timeout=30) as response:
            page = response.read().decode("utf-8", "replace")
            assert response.status == 200
    assert "Dask needs bokeh" not in page and "<html" in page.lower(), page[:300]
