"""Every tuned number of the reconstruction, in one frozen tree (the idea of gsplat's `DefaultStrategy`:
the algorithm's knobs are one declared, documented object; the functions take the section they need).

`ReconConfig` has one section per step: `hull` (visual hull and scene bounds), `lift` (normal
integration), `joint` (all views' depths solved as one surface), `fit` (Gaussian surfels), `fuse` (TSDF fusion),
`surf` (the global surface fit, issue 23), `mesh` (surface extraction, snapping,
decimation) and `bake` (UVs and texture). Each field is declared with `knob(...)`, which records its
meaning, unit and why it has the value it has (the commit or benchmarks/BENCHMARKS.md entry that
measured it, or "untuned"); `tests/test_recon_config.py` fails on a field without them.

Presets (`PRESETS`) are whole `ReconConfig`s. Overrides are given by dotted name
(`{"lift.contact_px": 1.0}`; the old flat names such as `grid_res` are aliases, `FLAT_ALIASES`) and
validated before any model loads: an unknown name or a bad value is a `BadRequest` that names it.
`to_dict()` is the JSON form recorded in job.json and in the stage cache key.

Numbers left inline in recon/ are not tuned: pixel-centre conventions (i + 0.5), the contract's
half-coverage mask threshold, numerical guards (clamp_min(1e-6)) and gsplat's own rasterization
constants (recon/rasterize.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from make_your_3d.errors import BadRequest


def knob(default: Any, help: str, unit: str = "", why: str = "untuned", lo: float | None = None):
    """A config field: default, what it means, its unit, what chose the value; `lo`: smallest valid value."""
    return field(default=default, metadata={"help": help, "unit": unit, "why": why, "lo": lo})


@dataclass(frozen=True)
class HullConfig:
    """Visual hull of the masks: its field, the scene's bounds, the hull depth along lifted rays."""

    mask_upsample: int = knob(4, "upsampling of each mask before its sharp edges are cut at sub-pixel precision "
                              "(edges land to 1/(2u) px); also the silhouette distance maps' resolution", "x",
                              "37305df (bilinear 0.5 threshold moved edges by up to 0.2 px); factor untuned", lo=1)
    sharp_edge: float = knob(0.05, "a partly covered pixel is a sharp edge (cut at sub-pixel precision) when a "
                             "neighbour is above 1 - this and one below this; soft mattes keep the bilinear crossing",
                             "coverage", "39b9d8c (cutting each pixel of a soft ramp combed it); untuned", lo=0)
    bounds_res: int = knob(64, "grid points along the longest side when finding the box around the hull", "points",
                           lo=4)
    bounds_level: float = knob(-0.25, "hull field value (mask - 1/2) counted as inside for the bounds (generous)",
                               "mask value - 1/2")
    bounds_pad: float = knob(2.0, "padding of the bounds box beyond the hull", "bounds-grid steps", lo=0)
    bounds_passes: int = knob(2, "refinements of the bounds box (each on a grid over the previous box)", "passes",
                              lo=1)
    march_steps: int = knob(96, "samples along each lifted pixel's ray when marching the hull field", "samples",
                            lo=2)
    march_refine: int = knob(8, "bisection steps refining each hull crossing (2^-n of a sample step)", "steps",
                             lo=0)
    mesh_res_divisor: int = knob(2, "the hull mesh (initial surfels) has fuse.grid_res / this cells", "ratio", lo=1)
    mesh_res_min: int = knob(32, "smallest hull mesh grid", "points", lo=4)
    mesh_res_max: int = knob(96, "largest hull mesh grid (it only seeds surfels where no view lifts points)",
                             "points", lo=4)


@dataclass(frozen=True)
class LiftConfig:
    """Normal integration: each orthographic view's normals -> a depth map anchored to the visual hull."""

    min_nz: float = knob(0.3, "normals whose component towards the camera is below this are not trusted (no slope)",
                         "cosine", "8a41605; untuned", lo=0)
    max_slope: float = knob(3.2, "clamp of the depth slope -n_xy/n_z (3.2 is about 73 degrees from facing)",
                            "depth per lateral unit", "8a41605; untuned", lo=0)
    jump_px: float = knob(1.5, "gradient edges where the hull's front jumps more than the normals allow by this "
                          "are cut (an occluding edge)", "px",
                          "efdb6c3 / BENCHMARKS earlier change 2: 4 -> 2 -> 1.5 px (chair seat/post step 1.8 px); "
                          "1 px cost the blob 0.4 dB", lo=0)
    irls: int = knob(2, "reweighted least-squares passes towards an L1 fit of the gradients", "passes", lo=0)
    anchor_weight: float = knob(1e-4, "weight of the weak pull of every pixel to the hull's front (fixes each piece)",
                                "relative to a gradient equation", lo=0)
    touch_quantile: float = knob(0.98, "quantile of the gap to the hull's front a piece is shifted by when it has too "
                                 "few contacts", "quantile", "8a41605; untuned", lo=0)
    rim_px: int = knob(2, "pixels next to the view's own silhouette left out of a piece's anchoring", "px",
                       "4e79384; untuned", lo=0)
    min_core_px: int = knob(8, "a piece drops its rim only if more pixels than this remain", "pixels", lo=0)
    min_quantile_px: int = knob(4, "a piece takes the quantile only with more pixels than this (else its max gap)",
                                "pixels", lo=0)
    contact_px: float = knob(1.5, "contacts count only within this of the quantile placement", "px",
                             "641f3e5 / BENCHMARKS change 12 (dish floor lifted 18 px without it; within 0.05 dB)",
                             lo=0)
    min_contacts: int = knob(8, "fewest contact pixels for a piece to be anchored on their median gap", "pixels",
                             "4e79384; untuned", lo=0)
    contact_fraction: float = knob(0.02, "... and at least this fraction of the piece's pixels", "fraction",
                                   "4e79384; untuned", lo=0)
    contact_max_cos: float = knob(0.05, "a contact's normal is this close to perpendicular to the other view's rays",
                                  "cosine", "4e79384: a gap of at most 0.0013 on a unit sphere (1/6 px at the "
                                  "benchmark's scale)", lo=0)
    contact_ramp: float = knob(0.45, "|mask - 1/2| below this counts as on the other view's contour (the sub-pixel "
                               "mask ramps only across its own edge)", "mask value", "4e79384; untuned", lo=0)
    area_min_cos: float = knob(0.2, "cosine floor when weighting a lifted pixel by the surface area it stands for "
                               "(initial surfel sampling)", "cosine", lo=1e-6)


@dataclass(frozen=True)
class JointConfig:
    """Every view's depth solved as one surface (recon/joint_depth.py): the views' normal-integration
    equations, matches between views that see the same surface, and the hull contacts, jointly."""

    enabled: bool = knob(True, "solve the views' depths jointly (False: each view's integral placed on the hull "
                         "alone)", "", "issue 17: BENCHMARKS 'joint depth' (tuning set)")
    rounds: int = knob(3, "rounds of matching pixels across views and re-solving", "rounds",
                       "issue 17 tuning sweep: 2 -> 3 with the wider first gate", lo=0)
    irls: int = knob(3, "reweighted solves per round (towards an L1 fit of the matches)", "passes", lo=0)
    gate_px: float = knob(6.0, "in the first round, matches farther apart than this along the normal are dropped "
                          "(an occluded or another surface)", "px",
                          "issue 17 tuning sweep: 6 beat 2 on chair/table/plant strong", lo=0)
    gate_final_px: float = knob(2.0, "the same gate in the last round (it shrinks linearly)", "px", lo=0)
    robust_px: float = knob(0.5, "matches farther apart than this count as L1 (one inconsistent view cannot drag "
                            "the surface)", "px", lo=1e-6)
    min_facing: float = knob(0.3, "a match needs the surface to face both views by at least this cosine", "cosine",
                             lo=0)
    min_agree: float = knob(0.8, "... and the two views' normals to agree to this cosine (the same surface)",
                            "cosine", lo=-1)
    stride: int = knob(2, "every stride-th pixel (in x and y) of a view is matched against the other views", "px",
                       lo=1)
    match_weight: float = knob(4.0, "weight of a match", "relative to one normal-integration equation",
                               "issue 17 tuning sweep: 4 beat 1 on kettlebell/ring strong", lo=0)
    contact_weight: float = knob(1.0, "weight holding a contact pixel on the hull's front",
                                 "relative to one normal-integration equation", "issue 17 tuning sweep: 4 changed "
                                 "nothing measurable", lo=0)
    prior_weight: float = knob(1e-3, "faint pull of every pixel to its hull-placed integral",
                               "relative to one normal-integration equation", lo=0)
    cg_iters: int = knob(300, "conjugate-gradient iterations per solve", "iterations", lo=1)


@dataclass(frozen=True)
class FitConfig:
    """Flat 3D Gaussians (surfels) fitted to colour, mask, normals and lifted depth."""

    iterations: int = knob(100, "Adam steps", "steps", "BENCHMARKS.md, fourth session of the surface fit (2026-12-06): 100 and 200 steps gave the same scores to the fourth digit on chair, plant, fish and vase", lo=0)
    render_size: int = knob(128, "longest side of the views while fitting", "px", "BENCHMARKS table", lo=8)
    num_gaussians: int = knob(12000, "surfels at initialisation (lifted pixels plus hull surfels)", "surfels",
                              "BENCHMARKS table", lo=8)
    views_per_step: int = knob(2, "views rendered per Adam step", "views", lo=1)
    lr_means: float = knob(2e-4, "learning rate of the positions", "scene sizes per step", "8a41605; untuned", lo=0)
    lr_scales: float = knob(1e-2, "learning rate of the log scales", "log units", lo=0)
    lr_quats: float = knob(5e-3, "learning rate of the quaternions", "unnormalised quaternion units", lo=0)
    lr_opacity: float = knob(5e-2, "learning rate of the opacity logits", "logits", lo=0)
    lr_colors: float = knob(2e-2, "learning rate of the colours", "colour in [0,1]", lo=0)
    w_rgb: float = knob(1.0, "colour L1 loss weight", "weight", lo=0)
    w_mask: float = knob(1.0, "alpha vs mask L1 loss weight", "weight", lo=0)
    w_normal: float = knob(0.1, "rendered normals vs given normals (1 - cos) weight", "weight", lo=0)
    w_depth_normal: float = knob(0.2, "normals of the rendered depth vs given normals (1 - cos) weight", "weight", lo=0)
    w_depth: float = knob(1.0, "rendered depth vs lifted depth L1 weight", "per scene size", lo=0)
    core_mask: float = knob(0.99, "mask value above which a pixel takes the normal and depth losses", "mask value",
                            lo=0)
    depth_alpha: float = knob(0.5, "rendered alpha above which the depth loss applies", "alpha", lo=0)
    depth_normal_alpha: float = knob(0.9, "rendered alpha above which the depth-normal loss applies", "alpha", lo=0)
    prune_every: int = knob(100, "steps between pruning near-transparent surfels (0: never)", "steps", lo=0)
    prune_opacity: float = knob(0.02, "surfels below this opacity are pruned", "opacity", lo=0)
    tile_size: int = knob(4, "tile side of the torch rasterizer (speed only, not the result's maths)", "px",
                          "BENCHMARKS 'Speed of the default reconstruction' (cubby, 60 steps: 3 px 1.12, 4 px 1.05, "
                          "5 px 1.10, 6 px 1.13, 8 px 1.23 s a step)", lo=1)
    thin: float = knob(0.08, "a surfel's normal-axis scale as a fraction of its smaller in-plane scale", "fraction",
                       "8a41605; untuned", lo=0)
    init_scale: float = knob(0.7, "initial in-plane scale", "mean surfel spacings", lo=0)
    init_opacity_logit: float = knob(4.0, "initial opacity logit (0.98: surfels start as surfaces)", "logit")
    hull_gap_spacings: float = knob(2.5, "hull surfels are added where no lifted point lies within this",
                                    "mean surfel spacings", lo=0)


@dataclass(frozen=True)
class FuseConfig:
    """TSDF fusion of lifted / rendered depth, bounded by the silhouettes' signed distances."""

    grid_res: int = knob(512, "grid points along the longest side of the box", "points",
                         "d6a47b3 / BENCHMARKS change 10: 384 -> 512 (chair 25.54 -> 26.06 dB)", lo=8)
    view_size: int = knob(256, "longest side at which normals are integrated and depths fused", "px",
                          "d6a47b3 / BENCHMARKS change 10 (fast 192 -> 256)", lo=8)
    trunc_voxels: float = knob(3.0, "truncation distance of the signed distance", "voxels", "8a41605; untuned",
                               lo=1e-6)
    solid_alpha: float = knob(0.9, "rendered alpha above which the Gaussians' depth is fused where nothing was "
                              "lifted (below it expected depth mixes surfaces)", "alpha", lo=0)
    edge_px: float = knob(1.0, "depth within this of a view's contour is not fused", "px",
                          "a85efa3 / BENCHMARKS earlier change 1", lo=0)
    chunk: int = knob(2_000_000, "voxels fused at once (memory only, not the result)", "voxels", "memory", lo=1)


@dataclass(frozen=True)
class SurfConfig:
    """One signed-distance grid fitted to every view at once (recon/surface_fit.py): volume-rendered
    silhouettes and normals, with visibility (transmittance), per-view weights from agreement."""

    enabled: bool = knob(True, "carve (and bridge) the fused field by the global fit before meshing; kept only when "
                         "its mesh renders closer to the views", "",
                         "issue 23 third version: the default (BENCHMARKS 'Third version'); off in the fast preset "
                         "(its time budget)")
    coarse_res: int = knob(48, "grid points along the longest side in the first stage", "points",
                           "issue 23; untuned", lo=8)
    fine_res: int = knob(96, "grid points along the longest side in the last stage", "points",
                         "issue 23; untuned", lo=8)
    iterations: int = knob(0, "Adam steps of the rendered refinement per stage (0: the carving alone)", "steps",
                           "issue 23: 30 steps moved the open box's floor from 8.1 to 10.1 px "
                           "(tests/test_surface_fit.py); "
                           "off until it pays", lo=0)
    rays: int = knob(3072, "pixels rendered per step, over all views (half from each view's foreground)",
                     "rays", "issue 23; untuned (speed)", lo=8)
    samples: int = knob(64, "samples along each ray inside the box", "samples", "issue 23; untuned", lo=4)
    lr: float = knob(0.3, "Adam learning rate of the distances", "voxels of the stage's grid per step",
                     "issue 23; untuned", lo=0)
    sharpness: float = knob(1.0, "width of the surface's density ramp (NeuS 1/s)", "voxels of the stage's grid",
                            "issue 23; untuned", lo=1e-6)
    w_mask: float = knob(1.0, "rendered opacity vs mask (binary cross-entropy) weight", "weight", lo=0)
    w_normal: float = knob(1.0, "rendered normal vs given normal (1 - cos) weight", "weight", lo=0)
    w_eikonal: float = knob(0.05, "|grad| = 1 on the grid; small (a large one holes thin parts, instant-nsr-pl)",
                            "weight", "issue 23; untuned", lo=0)
    w_smooth: float = knob(0.01, "squared Laplacian of the distances (in voxels)", "weight", "issue 23; untuned",
                           lo=0)
    core_mask: float = knob(0.99, "mask value above which a pixel's normal is fitted", "mask value", lo=0)
    grazing_cos: float = knob(0.15, "given normals closer than this cosine to perpendicular to the ray are dropped",
                              "cosine", "issue 23; untuned", lo=0)
    trim: float = knob(0.1, "fraction of each step's worst normal errors dropped", "fraction",
                       "issue 23; untuned", lo=0)
    visibility: bool = knob(True, "weight samples by their transmittance (False: every surface crossing along a "
                            "ray counts; a wrong variant for the tests)", "", "issue 23 tests")
    view_weights: bool = knob(True, "weight each view by its agreement with the fit of all views (False: equal "
                              "fixed weights; a wrong variant for the tests)", "", "issue 23 tests")
    carve_cos: float = knob(0.8, "two views that see a surface point with normals further apart than this cosine "
                            "(after a voxel of slack) carve it", "cosine", "issue 23; untuned", lo=-1)
    carve_thin_cos: float = knob(-0.3, "two views whose normals at a point are more opposite than this cosine see "
                                 "the two sides of a part thinner than a coarse voxel: they do not carve it", "cosine",
                                 "issue 23: without it the bowl's thin front wall was carved (held-out IoU 0.73 -> "
                                 "0.62, BENCHMARKS 'Global surface fit'); value untuned", lo=-1)
    carve_pair_cos: float = knob(0.2, "only views whose directions are within this cosine compare normals "
                                 "(0.2: within 78 degrees, so a thin part's two sides and views 90 degrees apart are "
                                 "never compared)", "cosine",
                                 "issue 23", lo=-1)
    carve_passes: int = knob(40, "most carving passes (each removes at most one layer of voxels)", "passes",
                             "issue 23; untuned", lo=0)
    contour_voxels: float = knob(1.5, "points that project within this many grid steps of a view's silhouette "
                                 "contour are never carved by a pair of views that includes that view (it sees a facet of a "
                                 "convex edge there that its neighbour may not; 0: no protection)", "grid steps",
                                 "issue 23: the chair's leg corners started a carving that ate its seat (Chamfer "
                                 "0.0020 -> 0.0183 with the guard alone; 0 points carved with it); untuned", lo=0)
    guard_cells: int = knob(1, "the silhouette guard's slack: a carved point stays carved only if a point left "
                            "within this many grid steps of it (in the view's image) still covers its foreground "
                            "pixel in every view (0: no guard)", "grid steps",
                            "issue 23: a backstop (the chair's carving restored 88 coarse points); untuned", lo=0)
    bridge_closure_voxels: float = knob(1.0, "after the carving, a view joins two of its openings across the closed "
                                        "pixels between them when its normals, integrated from one to the other, "
                                        "land within this many grid steps of the second (0: no bridging)",
                                        "grid steps", "issue 23; untuned", lo=0)
    carve_min_weight: float = knob(0.5, "views weighted below this (agreement with the others) do not vote in the "
                                   "carving", "weight", "issue 23; untuned", lo=0)


@dataclass(frozen=True)
class MeshConfig:
    """Surface extraction from the fused field, contour snapping, decimation to the face budget."""

    faces: int = knob(40000, "face budget", "faces", "BENCHMARKS table (default preset)", lo=8)
    smooth_sigma: float = knob(0.5, "Gaussian smoothing of the fused field before marching cubes", "voxels",
                               "BENCHMARKS: 0.3 gave the chair +0.4 dB but the blob -0.8 dB", lo=0)
    keep_fraction: float = knob(0.05, "components below this fraction of the largest one's area are dropped "
                                "(before decimation and in its repair)", "fraction", lo=0)
    snap_cos_max: float = knob(0.3, "vertices whose normal is within this cosine of perpendicular to a view are on "
                               "its contour generator (17 degrees)", "cosine", "fb35a91 / BENCHMARKS earlier change 5",
                               lo=0)
    snap_max_move: float = knob(0.7, "largest snap move", "voxels",
                                "fb35a91: 1.5 voxels cost the ring 0.6 dB and the blob 1.2 dB", lo=0)
    snap_max_px: float = knob(0.5, "largest snap move", "px of the view", "797d171 (fast's coarser grid bulged the blob)",
                              lo=0)
    snap_iterations: int = knob(2, "snapping passes", "passes", lo=0)
    snap_min_rate: float = knob(0.2, "floor of the rate at which a move along the normal approaches a contour",
                                "sine", lo=1e-6)
    decimate_tries: tuple = knob(((1.0, 7.0), (0.98, 7.0), (0.95, 7.0), (0.97, 4.0), (0.92, 7.0)),
                                 "(fraction of the budget, fast-simplification aggressiveness) tried in turn until "
                                 "the result is closed and within budget", "(ratio, agg)", "7945d07; untuned")
    repair_keep_faces: float = knob(0.9, "a MeshFix repair is kept only if it keeps this fraction of the faces",
                                    "fraction", "7945d07; untuned", lo=0)
    repair_area_change: float = knob(0.05, "... and changes the area by at most this fraction", "fraction",
                                     "7945d07; untuned", lo=0)


@dataclass(frozen=True)
class BakeConfig:
    """xatlas UVs and the texture baked from the views."""

    texture_size: int = knob(2048, "texture side", "texels", "BENCHMARKS table (default preset)", lo=8)
    padding_min: int = knob(2, "smallest padding between charts", "texels", lo=0)
    padding_per: int = knob(256, "one texel of chart padding per this many texels of texture side", "texels", lo=1)
    sharpness: float = knob(6.0, "a view's weight is cos^sharpness of its angle to the surface", "exponent",
                            "8a41605; untuned", lo=0)
    min_cos: float = knob(0.05, "views seeing the surface more edge-on than this give no colour", "cosine", lo=0)
    depth_tol_voxels: float = knob(2.0, "a texel is visible in a view if within this of the mesh's z-buffer",
                                   "voxels of fuse.grid_res", lo=0)
    rim_px: int = knob(1, "pixels next to the mesh's outline in a view give no colour", "px",
                       "a85efa3 / BENCHMARKS earlier change 3 (+0.6 dB chair and blob)", lo=0)
    fill_smoothness: float = knob(1.0, "Laplacian weight of the smooth fill of unseen texels", "weight",
                                  "2a1c6bd; untuned", lo=0)
    fill_pull: float = knob(1e-6, "faint pull to mid-grey keeping the fill's system regular", "weight", lo=0)
    # the asset's texture set (issue 26): which maps the GLB carries, and how each is baked
    base_color_map: bool = knob(True, "write the baked colour as baseColorTexture (False: a mid-grey baseColorFactor "
                                "only)", "", "issue 26: on by default")
    normal_map: bool = knob(True, "bake the fine surface (before simplification) into a tangent-space normalTexture "
                            "on the final UVs, and write MikkTSpace TANGENTs", "",
                            "issue 26, BENCHMARKS 'Asset maps': shading-normal error at held-out views")
    occlusion_map: bool = knob(True, "bake ambient occlusion of the final mesh into the R channel of an ORM texture "
                               "(occlusionTexture)", "", "issue 26: on by default")
    normal_scale: float = knob(1.0, "the normalTexture's scale (glTF: x and y of the map are multiplied by it)",
                               "factor", "glTF default; the map is baked for 1", lo=0)
    normal_candidates: int = knob(16, "fine triangles (nearest centroids) searched for each texel's closest fine "
                                  "surface point", "triangles", "issue 26; untuned (8 missed a few at grid 512)", lo=1)
    normal_reach: float = knob(0.02, "a fine surface point farther than this from the texel is not the same surface "
                               "(the texel keeps the simplified mesh's own normal)", "scene sizes",
                               "issue 26; about 7 voxels at grid 512; untuned", lo=0)
    normal_smooth: int = knob(8, "passes of averaging the fine surface's vertex normals with their neighbours' before "
                              "the bake (marching cubes' voxel-scale terracing is noise, not detail)", "passes",
                              "issue 26, BENCHMARKS 'Asset maps': chair 4.54 -> 3.68 deg, head 5.90 -> 4.57 (0 / 8 passes)", lo=0)
    normal_smooth_cos: float = knob(0.9, "... only across neighbours whose normals agree to this cosine (a crease is "
                                    "kept)", "cosine", "issue 26, BENCHMARKS 'Asset maps': 0.8 with 16 passes rounded the chair (4.87 deg)", lo=-1)
    normal_min_z: float = knob(0.05, "smallest z of a tangent-space normal (a fine normal turned away from the face "
                               "is kept just above its horizon)", "cosine", "issue 26; untuned", lo=0)
    orm_divisor: int = knob(2, "the ORM texture's side is texture_size / this (occlusion varies slowly)", "ratio",
                            "issue 26; untuned", lo=1)
    occlusion_directions: int = knob(48, "directions over the sphere each texel's occlusion is sampled in",
                                     "directions", "issue 26; untuned", lo=1)
    occlusion_map_px: int = knob(256, "side of the depth map rendered from each direction", "px",
                                 "issue 26; untuned", lo=8)
    occlusion_bias_px: float = knob(1.0, "a texel sees a direction if within this (plus the slope's share) of the "
                                    "depth map's front", "depth-map pixels", "issue 26; untuned", lo=0)
    occlusion_strength: float = knob(1.0, "the occlusionTexture's strength (glTF)", "factor", "glTF default", lo=0)
    roughness: float = knob(0.9, "the material's roughness (G of the ORM texture, else roughnessFactor): a matte "
                            "surface, since the baked colour already holds the views' lighting", "roughness",
                            "constant; no measured reason to vary it", lo=0)
    metallic: float = knob(0.0, "the material's metallic (B of the ORM texture, metallicFactor): the views give no "
                           "way to tell metal; the add-on's quad re-bake needs 0 to bake diffuse colour", "metallic",
                           "constant", lo=0)


SECTIONS = ("hull", "lift", "joint", "fit", "fuse", "surf", "mesh", "bake")

# ReconOptions' flat names (the CLI, presets' `recon` dicts) -> dotted names
FLAT_ALIASES = {
    "iterations": "fit.iterations", "render_size": "fit.render_size", "num_gaussians": "fit.num_gaussians",
    "views_per_step": "fit.views_per_step", "grid_res": "fuse.grid_res", "fuse_size": "fuse.view_size",
    "faces": "mesh.faces", "texture_size": "bake.texture_size", "base_color_map": "bake.base_color_map",
    "normal_map": "bake.normal_map", "occlusion_map": "bake.occlusion_map",
}


@dataclass(frozen=True)
class ReconConfig:
    """The whole reconstruction's settings (defaults: the `default` preset)."""

    seed: int = knob(0, "seed of the surfel sampling and the fit's view batches", "", "not a tuned number", lo=0)
    hull: HullConfig = field(default_factory=HullConfig)
    lift: LiftConfig = field(default_factory=LiftConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    surf: SurfConfig = field(default_factory=SurfConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    bake: BakeConfig = field(default_factory=BakeConfig)

    def to_dict(self) -> dict:
        """JSON-able nested dict (tuples as lists)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ReconConfig":
        return cls().with_overrides(flatten(d))

    def with_overrides(self, overrides: Mapping[str, Any]) -> "ReconConfig":
        """A copy with settings replaced by dotted name (or flat alias); BadRequest names a bad key or value."""
        by_section: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in overrides.items():
            name = FLAT_ALIASES.get(key, key)
            section, _, leaf = name.rpartition(".")
            if not section and leaf not in _TOP:
                raise BadRequest(f"Unknown reconstruction setting {key!r}: use section.name (sections "
                                 f"{', '.join(SECTIONS)}, e.g. 'lift.contact_px') or one of {', '.join(FLAT_ALIASES)}"
                                 ", seed.")
            if not section:
                top[leaf] = _checked(self, leaf, value, key)
            elif section in SECTIONS and "." not in section:
                by_section.setdefault(section, {})[leaf] = _checked(getattr(self, section), leaf, value, key)
            else:
                raise BadRequest(f"Unknown reconstruction setting {key!r}: sections are {', '.join(SECTIONS)} "
                                 "(e.g. 'lift.contact_px').")
        new = {s: dataclasses.replace(getattr(self, s), **kv) for s, kv in by_section.items()}
        return dataclasses.replace(self, **top, **new)

    def describe(self) -> list[dict]:
        """Every setting with its value, unit, meaning and provenance (for docs and the CLI)."""
        rows = []
        for name, f, value in _leaves(self):
            rows.append({"name": name, "value": value, **{k: f.metadata[k] for k in ("unit", "help", "why")}})
        return rows


_TOP = ("seed",)


def _leaves(cfg: ReconConfig):
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                yield f"{f.name}.{g.name}", g, getattr(value, g.name)
        else:
            yield f.name, f, value


def _checked(obj: Any, leaf: str, value: Any, key: str) -> Any:
    """The value converted to the field's type, or BadRequest naming the key."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    f = fields.get(leaf)
    if f is None or "help" not in f.metadata:
        known = ", ".join(sorted(n for n, g in fields.items() if "help" in g.metadata))
        raise BadRequest(f"Unknown reconstruction setting {key!r}; known here: {known}.")
    default = getattr(type(obj)(), leaf)
    bad = BadRequest(f"Reconstruction setting {key!r} = {value!r} must be {_kind(default)}"
                     + (f" >= {f.metadata['lo']}" if f.metadata["lo"] is not None else "") + ".")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise bad
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif isinstance(default, tuple):
        try:
            value = _like(default, value)
        except (TypeError, ValueError):
            raise bad from None
        return value
    if f.metadata["lo"] is not None and value < f.metadata["lo"]:
        raise bad
    return value


def _like(default: tuple, value: Any) -> tuple:
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError
    proto = default[0]
    if isinstance(proto, tuple):
        return tuple(_like(proto, v) for v in value)
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in out):
        raise ValueError
    return out


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a finite number"
    return f"a list like {list(_jsonable(default))}"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'fit': {'iterations': 3}} -> {'fit.iterations': 3}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


DEFAULT = ReconConfig()

# Knobs that differ per preset (BENCHMARKS.md table and change 10 measured these three).
PRESETS: dict[str, ReconConfig] = {
    "fast": DEFAULT.with_overrides({"fit.render_size": 96, "fit.num_gaussians": 6000,
                                    "fuse.grid_res": 320, "fuse.view_size": 256, "mesh.faces": 20000,
                                    "bake.texture_size": 1024, "surf.enabled": False}),
    "default": DEFAULT,
    "quality": DEFAULT.with_overrides({"fit.iterations": 600, "fit.render_size": 192, "fit.num_gaussians": 25000,
                                       "fit.views_per_step": 3, "fuse.grid_res": 576, "fuse.view_size": 512,
                                       "mesh.faces": 50000}),
}


def preset_config(name: str) -> ReconConfig:
    if name not in PRESETS:
        raise BadRequest(f"Unknown reconstruction preset {name!r}; use one of {', '.join(PRESETS)}.")
    return PRESETS[name]


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`["lift.contact_px=1.0", "mesh.faces=20000"]` -> overrides (values read as JSON, else kept as
    text, so the config's validation names a bad one)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise BadRequest(f"Reconstruction setting {item!r} must look like name=value (e.g. lift.contact_px=1.0).")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out
