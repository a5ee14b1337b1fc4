"""The one measure of how far an output is from the expected one, for tests and benchmarks alike."""
import torch


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` (Frobenius norms, in float64, on the CPU); the shapes must be equal."""
    assert got.shape == want.shape, f"shape {tuple(got.shape)} where {tuple(want.shape)} was expected"
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    return ((got - want).norm() / want.norm()).item()


def assert_relative_close(got: torch.Tensor, want: torch.Tensor, tolerance: float = 1e-5) -> None:
    error = relative_error(got, want)
    assert error < tolerance, f"relative error {error:.2e} (tolerance {tolerance:.0e})"
