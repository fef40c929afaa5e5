"""Settings for the whole test session."""
import torch


def pytest_configure(config):
    # Tests run tiny tensors on a shared 2-core machine, where torch's multi-threaded kernels
    # wait on descheduled workers (3-50x slower). One thread for the whole session also keeps
    # float summation order the same in every test, which the exact-equality tests rely on.
    torch.set_num_threads(1)
