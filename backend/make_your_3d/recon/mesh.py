"""Surface extraction: TSDF fusion of depths rendered from the fitted Gaussians, bounded by the
input masks as distances to their silhouettes, marching cubes (scikit-image), the largest
component(s), contour vertices snapped onto the visual hull, and simplification to the face budget
(fast-simplification), repaired to a closed manifold surface where decimation pinched it (pymeshfix)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import fast_simplification
import numpy as np
import pymeshfix
import torch
import trimesh
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.measure import marching_cubes
from torch import Tensor

from make_your_3d.recon.camera import Cameras, pixel_size, project, sample_image, view_dirs
from make_your_3d.recon.config import FuseConfig, HullConfig, MeshConfig
from make_your_3d.recon.scene import grid_counts, subpixel_mask

log = logging.getLogger("make_your_3d.recon")


@dataclass
class DepthView:
    """A depth map to fuse: camera, expected depth (H,W), coverage alpha (H,W), and the mask that says
    which pixels are background for sure (None: use alpha)."""

    cams: Cameras  # one camera
    depth: Tensor
    alpha: Tensor
    mask: Tensor | None = None
    slope: Tensor | None = None  # (H,W,2) depth change per pixel step in x and y (from normals), 0 unknown

    @property
    def foreground(self) -> Tensor:
        return self.mask if self.mask is not None else self.alpha


def silhouette_distance(mask: Tensor, upsample: int = HullConfig.mask_upsample,
                        sharp: float = HullConfig.sharp_edge) -> Tensor:
    """Signed distance to the mask's contour in pixels (positive outside), at `upsample` times the
    mask's resolution; the contour is the anti-aliased edges' sub-pixel position (`subpixel_mask`)."""
    m = subpixel_mask(mask, upsample, sharp).cpu().numpy()
    if not m.any():
        return torch.full(m.shape, float(max(m.shape)) / upsample, device=mask.device)
    outside = ndimage.distance_transform_edt(~m) - 0.5  # contour half-way between pixel centres
    inside = ndimage.distance_transform_edt(m) - 0.5
    sd = np.where(m, -inside, outside) / upsample
    return torch.tensor(sd, dtype=torch.float32, device=mask.device)


@dataclass
class Silhouette:
    """One carving view's silhouette as a signed distance map (`silhouette_distance`), computed once and
    shared by the fusion and the contour snapping."""

    cams: Cameras
    distance: Tensor  # (H*upsample, W*upsample) pixels of the view, positive outside
    upsample: int

    def sample(self, uv: Tensor) -> Tensor:
        """Signed distance in the view's pixels at pixel coordinates uv (N,2); far outside off the image."""
        W, H, u = self.cams.width, self.cams.height, self.upsample
        return sample_image(self.distance[..., None], uv * u, W * u, H * u, outside=float(max(W, H)))[:, 0]


def silhouettes(views: list[DepthView], cfg: HullConfig = HullConfig()) -> list[Silhouette]:
    """Each view's Silhouette (its foreground's signed distance, for carving)."""
    u = cfg.mask_upsample
    return [Silhouette(dv.cams, silhouette_distance(dv.foreground, u, cfg.sharp_edge), u) for dv in views]


def tsdf_field(views: list[DepthView], lo: np.ndarray, hi: np.ndarray, res: int, trunc: float,
               device: torch.device, sils: list[Silhouette] | None = None,
               cfg: FuseConfig = FuseConfig()) -> tuple[np.ndarray, float]:
    """Truncated signed distance in units of `trunc` (positive outside) on a grid over [lo, hi].

    Two fields meet with a max (a CSG intersection): depths fused the usual way (a weighted mean of
    truncated distances along each view's rays; voxels no depth sees stay inside), and the visual hull
    as a distance: each carving view's signed 2D distance to its silhouette, in world units, is a lower
    bound of the distance to the surface, so near the contour it places the surface where the masks do
    instead of pulling it a voxel inwards as a saturated 'free space' vote would (which erodes thin
    parts). Depth within `edge_px` of a view's contour is not fused: it mixes the surface with what lies
    behind the edge (`cfg.edge_px`). Voxels are processed in chunks so memory stays flat at fine grids.
    `sils`: the views' `silhouettes`, when the caller has them already."""
    step = float(np.max(hi - lo)) / (res - 1)
    counts = grid_counts(lo, hi, res)
    origin = torch.tensor(lo, dtype=torch.float32, device=device)
    sils = silhouettes(views) if sils is None else sils
    n = int(np.prod(counts))
    field = torch.empty(n, device=device)
    chunk = cfg.chunk
    for i in range(0, n, chunk):
        # the grid's points for flat indices [i, i + chunk) in C order (x slowest), made on the fly
        flat = torch.arange(i, min(i + chunk, n), device=device)
        ijk = torch.stack([flat // int(counts[1] * counts[2]), (flat // int(counts[2])) % int(counts[1]),
                           flat % int(counts[2])], -1)
        field[i : i + chunk] = _fuse_chunk(views, sils, origin + ijk.float() * step, trunc, cfg.edge_px)
    return field.reshape(*[int(c) for c in counts]).cpu().numpy(), step


def _fuse_chunk(views: list[DepthView], sils: list[Silhouette], pts: Tensor, trunc: float,
                edge_px: float) -> Tensor:
    num = torch.zeros(pts.shape[0], device=pts.device)
    den = torch.zeros_like(num)
    hull = torch.full_like(num, -1.0)
    outside = torch.zeros(pts.shape[0], dtype=torch.bool, device=pts.device)
    for dv, sil in zip(views, sils):
        W, H = dv.cams.width, dv.cams.height
        uv, z = project(pts, dv.cams)
        ix, iy = torch.floor(uv[:, 0]).long(), torch.floor(uv[:, 1]).long()
        inside = (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H)
        ixc, iyc = ix.clamp(0, W - 1), iy.clamp(0, H - 1)
        d = dv.depth[iyc, ixc]
        if dv.slope is not None:
            # the depth at the point's own sub-pixel position on its pixel's tangent plane: a pixel-centre
            # lookup puts a convex edge up to half a pixel too deep, which the max with the hull cannot undo
            g = dv.slope[iyc, ixc]
            d = d + g[:, 0] * (uv[:, 0] - ixc - 0.5) + g[:, 1] * (uv[:, 1] - iyc - 0.5)
        outside |= ~inside  # every view is assumed to see the whole subject
        covered = inside & (dv.alpha[iyc, ixc] > 0.5) & torch.isfinite(d) & (dv.foreground[iyc, ixc] >= 0.5)
        sd_px = sil.sample(uv)
        hull = torch.maximum(hull, (sd_px * pixel_size(dv.cams, z) / trunc).clamp(-1.0, 1.0))
        covered &= sd_px < -edge_px
        sdf = (d - z) / trunc
        seen = covered & (sdf > -1.0)
        num += torch.where(seen, sdf.clamp(max=1.0), torch.zeros_like(sdf))
        den += seen.to(den.dtype)
    fused = torch.where(den > 0, num / den.clamp_min(1e-6), torch.full_like(num, -1.0))
    return torch.where(outside, torch.ones_like(fused), torch.maximum(fused, hull))


def snap_to_silhouettes(mesh: trimesh.Trimesh, views: list[DepthView], step: float,
                        sils: list[Silhouette] | None = None, cfg: MeshConfig = MeshConfig()) -> trimesh.Trimesh:
    """Move vertices on a view's contour generator onto the visual hull (same faces, new positions).

    Where a surface turns away from a view (its normal nearly perpendicular to the viewing direction),
    that view's silhouette passes through it, so it lies on the visual hull. Marching cubes cuts the
    box-like corners that form such contours by a fraction of a voxel, which shows as a missing pixel
    along thin parts seen at an angle. Each such vertex is moved along its normal until it meets the
    first silhouette it would cross (the signed 2D distances to the silhouettes are sub-pixel), if that
    is less than `cfg.snap_max_move` voxels and `cfg.snap_max_px` pixels away: further than that the hull is more likely
    loose than the mesh wrong (larger moves bulged the blob and ring). `sils`: the views' `silhouettes`,
    when the caller has them already."""
    carving = silhouettes(views) if sils is None else sils
    if not carving or len(mesh.vertices) == 0:
        return mesh
    dev = carving[0].distance.device
    V = torch.tensor(np.asarray(mesh.vertices), dtype=torch.float32, device=dev)
    N = torch.tensor(np.asarray(mesh.vertex_normals), dtype=torch.float32, device=dev)
    for _ in range(cfg.snap_iterations):
        # how far each vertex may move along its normal before it leaves some view's silhouette: that
        # view's 2D distance over the rate at which the move approaches its contour (the normal's part
        # in its image plane); a contour view's bound is where the vertex meets its silhouette
        room = torch.full((V.shape[0],), float("inf"), device=dev)
        pixel = torch.full((V.shape[0],), float("inf"), device=dev)
        on_contour = torch.zeros(V.shape[0], dtype=torch.bool, device=dev)
        for sil in carving:
            uv, z = project(V, sil.cams)
            cos = (N * view_dirs(V, sil.cams)).sum(-1)
            rate = (1 - cos**2).clamp_min(0).sqrt().clamp_min(cfg.snap_min_rate)
            size = pixel_size(sil.cams, z)
            room = torch.minimum(room, -sil.sample(uv) * size / rate)
            pixel = torch.minimum(pixel, size)
            on_contour |= cos.abs() < cfg.snap_cos_max
        move = on_contour & (room > 0) & (room < torch.clamp(cfg.snap_max_px * pixel, max=cfg.snap_max_move * step))
        V = torch.where(move[:, None], V + room[:, None] * N, V)
    return trimesh.Trimesh(V.cpu().numpy().astype(np.float64), np.asarray(mesh.faces), process=False)


def clean_field(field: np.ndarray, sigma: float = MeshConfig.smooth_sigma) -> np.ndarray:
    """Light smoothing (fusion noise otherwise leaves tiny handles and bubbles that break decimation into
    non-manifold pieces), then enclosed pockets of 'outside' (cavities nothing could see) filled."""
    f = ndimage.gaussian_filter(field.astype(np.float32), sigma) if sigma > 0 else field.astype(np.float32)
    inside = f < 0
    pockets = ndimage.binary_fill_holes(inside) & ~inside
    return np.where(pockets, -np.abs(f), f)


def field_to_mesh(field: np.ndarray, lo: np.ndarray, step: float) -> trimesh.Trimesh:
    """Marching cubes of the zero level set (negative inside), padded so the surface closes."""
    f = np.pad(field, 1, constant_values=1.0)
    if not ((f < 0).any() and (f > 0).any()):
        raise ValueError("the fused field has no surface")
    verts, faces, _, _ = marching_cubes(f, 0.0, spacing=(step, step, step))
    verts = verts - step + lo
    mesh = trimesh.Trimesh(verts, faces[:, ::-1], process=True)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def keep_largest(mesh: trimesh.Trimesh, min_fraction: float = MeshConfig.keep_fraction) -> trimesh.Trimesh:
    """Drop floaters: keep components with at least `min_fraction` of the largest one's area."""
    parts = mesh.split(only_watertight=False)
    if len(parts) <= 1:
        return mesh
    areas = np.array([p.area for p in parts])
    keep = [p for p, a in zip(parts, areas) if a >= min_fraction * areas.max()]
    return trimesh.util.concatenate(keep)


def non_manifold_edges(mesh: trimesh.Trimesh) -> int:
    """Edges not shared by exactly two faces (boundary or non-manifold), counted on vertex indices."""
    if len(mesh.faces) == 0:
        return 0
    _, counts = np.unique(np.sort(mesh.edges, axis=1), axis=0, return_counts=True)
    return int((counts != 2).sum())


def non_manifold_vertices(mesh: trimesh.Trimesh) -> int:
    """Vertices whose faces form more than one fan (two sheets touching at a point, a 'bowtie'): the
    corners at a vertex are linked through the faces sharing an edge there, and each vertex should
    have one group of linked corners."""
    faces = np.asarray(mesh.faces)
    if len(faces) == 0:
        return 0
    pairs, edges = mesh.face_adjacency, mesh.face_adjacency_edges
    if len(pairs) == 0:
        return 0
    rows, cols = [], []
    for k in range(2):  # both ends of each shared edge link the two faces' corners at that vertex
        v = edges[:, k]
        slot_a = np.argmax(faces[pairs[:, 0]] == v[:, None], axis=1)
        slot_b = np.argmax(faces[pairs[:, 1]] == v[:, None], axis=1)
        rows.append(pairs[:, 0] * 3 + slot_a)
        cols.append(pairs[:, 1] * 3 + slot_b)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    n = len(faces) * 3
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    groups = np.unique(np.stack([faces.reshape(-1), labels], 1), axis=0)
    return int(len(groups) - len(np.unique(faces)))


def is_closed_manifold(mesh: trimesh.Trimesh) -> bool:
    """Closed (every edge shared by two faces, consistently wound) and manifold at edges and vertices."""
    return (len(mesh.faces) > 0 and non_manifold_edges(mesh) == 0 and bool(mesh.is_watertight)
            and non_manifold_vertices(mesh) == 0)


def _oriented(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    if mesh.is_watertight and mesh.volume < 0:
        mesh.invert()
    return mesh


@dataclass
class MeshFixOutcome:
    """What one MeshFix run on a broken component did and left: logged as one sentence and kept in
    the reconstruction record (job.json), so "not watertight" always comes with its reason."""

    faces_in: int
    faces_out: int
    holes_filled: int
    holes_left: int  # boundary loops MeshFix could not close
    components: int  # connected pieces of the component as kept
    cleaned: bool  # its degeneracy/self-intersection pass finished with none left
    kept: bool  # the repair replaced the component (False: it gutted the piece; the broken piece stayed)
    watertight: bool  # the component as kept is closed and manifold

    def sentence(self) -> str:
        if self.kept:
            head = f"MeshFix rebuilt a broken piece ({self.faces_in} -> {self.faces_out} faces, {self.holes_filled} holes filled)"
        else:
            head = (f"MeshFix would have cut a broken piece from {self.faces_in} to {self.faces_out} faces; kept the piece as it was "
                    f"(the next decimation try may close it)")
        left = f"{self.holes_left} holes left" if self.kept else "its holes and pinched edges left"
        rest = "" if self.cleaned or not self.kept else ", some degenerate or self-intersecting faces left"
        pieces = f"{self.components} piece{'s' if self.components != 1 else ''}"
        return f"{head}: {left}{rest}, {pieces}; {'watertight' if self.watertight else 'not watertight'}."

    def to_dict(self) -> dict:
        return asdict(self)


def meshfix(part: trimesh.Trimesh) -> tuple[trimesh.Trimesh, MeshFixOutcome]:
    """MeshFix on one component, step by step as `pymeshfix.clean_from_arrays` runs it (drop small
    components, fill holes, remove degeneracies and self-intersections, fill again), but quiet and
    with its outcome: that function prints "MeshFix could not fix everything" to stderr exactly when
    it *did* fix everything (pymeshfix 0.18's test is inverted), and says nothing of what it left."""
    tin = pymeshfix.PyTMesh()
    tin.set_quiet(1)
    tin.load_array(np.ascontiguousarray(part.vertices, np.float64), np.ascontiguousarray(part.faces, np.int32))
    tin.remove_smallest_components()
    filled = tin.fill_small_boundaries() if tin.n_boundaries else 0
    cleaned = tin.clean()
    if tin.n_boundaries:
        filled += tin.fill_small_boundaries()
        cleaned = tin.clean()
    holes_left = tin.n_boundaries
    v, f = tin.return_arrays()
    fixed = trimesh.Trimesh(v, f, process=True)
    return fixed, MeshFixOutcome(int(len(part.faces)), int(len(fixed.faces)), int(filled), int(holes_left), pieces(fixed), bool(cleaned),
                                 True, is_closed_manifold(fixed))


def pieces(mesh: trimesh.Trimesh) -> int:
    """Connected pieces (faces joined through shared edges)."""
    return len(trimesh.graph.connected_components(mesh.face_adjacency, nodes=np.arange(len(mesh.faces)), min_len=1))


def boundary_loops(mesh: trimesh.Trimesh) -> int:
    """Holes: connected chains of boundary edges (edges with one face)."""
    edges = mesh.edges_sorted
    if len(edges) == 0:
        return 0
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    border = unique[counts == 1]
    if len(border) == 0:
        return 0
    nodes, idx = np.unique(border.reshape(-1), return_inverse=True)
    idx = idx.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(idx), np.int8), (idx[:, 0], idx[:, 1])), shape=(len(nodes), len(nodes)))
    return int(connected_components(graph, directed=False)[0])


def surface_report(mesh: trimesh.Trimesh, repairs: list[MeshFixOutcome]) -> dict:
    """The facts a user needs about the final surface: closed and manifold or not, its holes and
    pieces, and what each MeshFix run left (job.json `mesh`, the reconstruction record)."""
    return {"watertight": is_closed_manifold(mesh), "holes": boundary_loops(mesh), "components": pieces(mesh),
            "meshfix": [r.to_dict() for r in repairs]}


def repair(mesh: trimesh.Trimesh, cfg: MeshConfig = MeshConfig()) -> tuple[trimesh.Trimesh, list[MeshFixOutcome]]:
    """Make a decimated surface closed and manifold again; returns it and each MeshFix outcome.

    Decimation pinches thin spots: tiny slivers split off (two back-to-back triangles, a dozen-face
    bubble) and the edge where they hung becomes non-manifold. So: drop pieces far smaller than the
    largest (as `keep_largest` does before decimation), keep closed components untouched, and rebuild each
    broken component with MeshFix (`meshfix`), which removes the non-manifold/degenerate faces around the
    pinch and fills the resulting holes into a single closed manifold surface. A component that MeshFix
    would gut is left as it was (still open)."""
    parts = mesh.split(only_watertight=False)
    if len(parts) == 0:
        return mesh, []
    areas = np.array([p.area for p in parts])
    out = []
    outcomes = []
    for part, area in zip(parts, areas):
        if area < cfg.keep_fraction * areas.max():
            continue
        if not is_closed_manifold(part):
            fixed, outcome = meshfix(part)
            # MeshFix only trims around the pinch; if it threw away much of the piece (it can on a
            # decimation far too coarse for the shape), keep the broken piece and let the caller retry
            if len(fixed.faces) >= cfg.repair_keep_faces * len(part.faces) and abs(fixed.area - part.area) <= cfg.repair_area_change * part.area:
                part = fixed
            else:
                outcome.kept, outcome.watertight, outcome.components = False, False, pieces(part)
            outcomes.append(outcome)
            log.info("%s", outcome.sentence())
        out.append(_oriented(part))
    if not out:
        return mesh, outcomes
    return (out[0] if len(out) == 1 else trimesh.util.concatenate(out)), outcomes


def _decimate(mesh: trimesh.Trimesh, target: int, agg: float) -> trimesh.Trimesh:
    v, f = fast_simplification.simplify(np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.int64),
                                        target_count=target, agg=agg)
    out = trimesh.Trimesh(v, f, process=True)
    if out.volume < 0:
        out.invert()
    return out


def simplify(mesh: trimesh.Trimesh, faces: int, cfg: MeshConfig = MeshConfig()) -> tuple[trimesh.Trimesh, list[MeshFixOutcome]]:
    """Quadric decimation down to the face budget (no-op when already under it), closed and manifold;
    returns the mesh and the outcome of each MeshFix run on the way (of the decimation tried last).

    Collapses occasionally pinch an edge into a non-manifold one; the decimated surface is then
    repaired (`repair`: slivers dropped, broken components rebuilt by MeshFix). Hole filling can add a
    few faces, so if the repaired mesh is over budget, decimate to a slightly smaller target and repair
    again. A result that is not closed is returned only if the input was not closed either (or nothing
    closed was found; the record then reports it as not watertight, with what MeshFix left)."""
    if len(mesh.faces) <= faces:
        return mesh, []
    tries = []
    for target, agg in cfg.decimate_tries:
        out = _decimate(mesh, int(faces * target), agg)
        outcomes: list[MeshFixOutcome] = []
        if mesh.is_watertight and not is_closed_manifold(out):
            out, outcomes = repair(out, cfg)
        tries.append((out, outcomes))
        if len(out.faces) <= faces and (is_closed_manifold(out) or not mesh.is_watertight):
            return out, outcomes
    within = [t for t in tries if len(t[0].faces) <= faces]
    return within[0] if within else min(tries, key=lambda t: len(t[0].faces))
