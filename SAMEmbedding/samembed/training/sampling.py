"""SAM's two-view sampling: two crops of one volume at random scales, overlapping around a seed point.

Everything is expressed in the cached volume's own millimetre frame (``position_mm = index * spacing``,
index in (k, j, i) order here, i.e. z, y, x). A view is an axis-aligned grid of ``size`` voxels of
``spacing * scale`` mm centred at ``centre_mm``; it is cut out with trilinear ``grid_sample`` so that
the world position of every view voxel is known exactly. Positives are then "the same millimetre
position in both views".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class View:
    """A sampled view: ``image`` (1, *size) and the mm position of its first voxel and its step."""

    image: torch.Tensor
    start_mm: torch.Tensor  # (d,) position of voxel 0, zyx order (in the view's own axis-aligned frame)
    step_mm: torch.Tensor  # (d,) voxel step, zyx order
    rotation: torch.Tensor | None = None  # (d, d) view axes -> volume axes (zyx), about ``centre_mm``; None = identity
    centre_mm: torch.Tensor | None = None  # (d,) centre of the rotation, volume mm (zyx)
    body_threshold: float | None = None  # mapped intensity above which a voxel is body (None: the CT value)

    def to_world(self, points_view_mm: torch.Tensor) -> torch.Tensor:
        """Map points (N, d) from the view's axis-aligned frame (where voxel ``n`` sits at
        ``start_mm + n * step_mm``) to the cached volume's mm frame (zyx). Identity without rotation."""
        if self.rotation is None:
            return points_view_mm
        return (points_view_mm - self.centre_mm) @ self.rotation.T + self.centre_mm

    def to_view(self, points_mm: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_world`: volume mm (N, d) to the view's axis-aligned frame."""
        if self.rotation is None:
            return points_mm
        return (points_mm - self.centre_mm) @ self.rotation + self.centre_mm

    def mm_to_norm(self, points_mm: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """Map mm points (N, d) to grid_sample coordinates (align_corners=False) of a map of ``size``
        that covers this view with a uniform stride (output voxel centres as in NetSpec)."""
        points_mm = self.to_view(points_mm)
        extent = torch.tensor([s for s in self.image.shape[1:]], dtype=points_mm.dtype) * self.step_mm
        lo = self.start_mm - self.step_mm / 2
        rel = (points_mm - lo) / extent  # 0..1 across the view
        return (rel * 2 - 1).flip(-1)  # grid_sample wants x, y, z


def rotation_matrix(angle_deg: float, d: int) -> torch.Tensor:
    """(d, d) rotation by ``angle_deg`` in the plane of the last two axes (y, x), zyx order: the image plane
    of a radiograph, the axial plane of a volume."""
    a = np.deg2rad(angle_deg)
    r = torch.eye(d)
    r[d - 2:, d - 2:] = torch.tensor([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], dtype=torch.float32)
    return r


def sample_view(volume: torch.Tensor, centre_mm: np.ndarray, size: int, step_mm: float, spacing_mm: float,
                fill: float, angle_deg: float = 0.0, first_voxel_mm: float = 0.0) -> View:
    """Cut a cubic view of ``size`` voxels of ``step_mm`` centred at ``centre_mm`` from ``volume``.

    Args:
        volume: (1, 1, *shape) float tensor on a grid of ``spacing_mm``.
        fill: value outside the volume.
        angle_deg: rotate the view's axes by this angle about ``centre_mm`` in the (y, x) plane (0 = axis-aligned).
        first_voxel_mm: the position of ``volume``'s first voxel centre on every axis (mm): 0 for the volume itself,
            1.5 input voxels for its 4 x 4 x 4 average (pooled voxel k is the mean of input voxels 4k .. 4k + 3).
    """
    d = volume.dim() - 2
    shape = torch.tensor(volume.shape[2:], dtype=torch.float32)
    centre = torch.as_tensor(centre_mm, dtype=torch.float32)
    start = centre - step_mm * (size - 1) / 2
    axes = [start[a] + step_mm * torch.arange(size, dtype=torch.float32) for a in range(d)]
    mesh = torch.meshgrid(*axes, indexing="ij")
    view = View(torch.empty(0), start, torch.full((d,), float(step_mm)))
    if angle_deg:
        view.rotation, view.centre_mm = rotation_matrix(angle_deg, d), centre
    pos = view.to_world(torch.stack(mesh, -1).reshape(-1, d)).reshape(*mesh[0].shape, d)
    idx = (pos - first_voxel_mm) / spacing_mm  # voxel index zyx
    norm = (idx + 0.5) / shape * 2 - 1  # align_corners=False
    grid = norm.flip(-1).unsqueeze(0)
    out = F.grid_sample(volume - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    view.image = out[0]
    return view


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (C, *spatial) tensor, sigma in voxels."""
    if sigma <= 0:
        return x
    r = max(1, int(round(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    d = x.dim() - 1
    y = x.unsqueeze(0)
    conv = F.conv3d if d == 3 else F.conv2d
    for a in range(d):
        shape = [1, 1] + [1] * d
        shape[2 + a] = len(k)
        pad = [0] * (2 * d)
        pad[2 * (d - 1 - a)] = r
        pad[2 * (d - 1 - a) + 1] = r
        y = conv(F.pad(y, pad, mode="replicate"), k.reshape(shape))
    return y[0]


def augment(x: torch.Tensor, rng: np.random.Generator, noise_std: float, blur_p: float, blur_sigma: tuple[float, float],
            contrast: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """Small intensity noise and optional blur (and contrast/gamma jitter for radiographs)."""
    if rng.random() < blur_p:
        x = gaussian_blur(x, float(rng.uniform(*blur_sigma)))
    if contrast > 0:
        x = x * float(rng.uniform(1 - contrast, 1 + contrast))
    if gamma > 0:
        g = float(np.exp(rng.uniform(-gamma, gamma)))
        lo, hi = -50.0, 205.0
        x = ((x - lo).clamp(min=0) / (hi - lo)) ** g * (hi - lo) + lo
    if noise_std > 0:
        x = x + noise_std * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    return x


def random_body_point(arr: np.ndarray, rng: np.random.Generator, threshold: float, tries: int = 50) -> np.ndarray:
    """A random voxel index (zyx) whose value exceeds ``threshold`` (falls back to any voxel)."""
    for _ in range(tries):
        idx = np.array([rng.integers(0, s) for s in arr.shape])
        if float(arr[tuple(idx)]) > threshold:
            return idx
    return np.array([rng.integers(0, s) for s in arr.shape])
