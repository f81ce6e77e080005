import logging
import os
import signal

# Under xdist (-n N), one thread a worker and a process it starts (train.py, torchrun's ranks, a probe server), for
# torch's intra-op pool and numpy's OpenBLAS (FID's eigvals) alike: N workers of two threads each on N cores would
# spin-wait on each other's cores. Set before torch and numpy load, which read it once.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(items):
    """The tests marked slow first, and with them the tests that share a module's fixture with one (the order is
    otherwise kept): with a slow test last, one xdist worker would run it alone while the other waits; and a module's
    fixture is made again each time its tests resume after another module's (test_fsdp's: three launches)."""
    def module_fixtures(item):
        return {id(fixture) for name in item.fixturenames for fixture in item._fixtureinfo.name2fixturedefs.get(name, ())
                if fixture.scope == "module"}
    slow = set().union(*(module_fixtures(item) for item in items if item.get_closest_marker("slow")))
    items.sort(key=lambda item: not (item.get_closest_marker("slow") or module_fixtures(item) & slow))


@pytest.fixture(autouse=True)
def own_signal_handlers():
    """Each test keeps the worker's Ctrl-C and SIGTERM handlers: a test of a torchrun rank's exit
    (data.errors_of_rank_0_first) leaves them ignored, as the rank's exit would. Its logging too: a test of a rank
    other than 0 (prepare.main with RANK=1) turns the warnings off, as data.quiet_unless_rank_0 does for the rank."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    logging.disable(logging.NOTSET)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """-> (root, skipped ids): root/images (an image folder), root/models (tiny encoders), root/out and root/out_pq
    (prepared from the folder and from parquet); see tiny_prepared.py."""
    from tiny_prepared import make_prepared
    root, threads = tmp_path_factory.mktemp("data"), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second intra-op thread only waits on shared CPUs
    skipped = make_prepared(root)
    torch.set_num_threads(threads)
    return root, skipped


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """A Hugging Face hub that refuses connections (a closed local port) and an empty cache: what an offline
    machine sees."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return constants
