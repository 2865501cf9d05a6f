"""The observation table of a reconstruction, and the point colours made from it, on real images (Strecha
fountain, SIFT, simulated VGGT-level prior)."""

import numpy as np
from sfm_scenes import scene, simulated_prior, tracks  # noqa: F401 (fixtures)

from vggt_sfm.mapping import color_points, initialize_reconstruction
from vggt_sfm.observations import observation_table
from vggt_sfm.refine import RefineConfig, refine_reconstruction


def test_the_table_holds_exactly_the_track_elements(scene, tracks):
    rec, _ = initialize_reconstruction(simulated_prior(scene), scene.features, tracks, None)
    refine_reconstruction(rec, RefineConfig(rounds=2), verified=scene.verified, features=scene.features)
    table = observation_table(rec)
    from_tracks = {
        (e.image_id, e.point2D_idx, point_id) for point_id, p in rec.points3D.items() for e in p.track.elements
    }
    rows = set(zip(table.image_id.tolist(), table.point2D_idx.tolist(), table.point3D_id.tolist()))
    assert len(rows) == len(table.image_id) == rec.compute_num_observations() == len(from_tracks)
    assert rows == from_tracks
    # Restricted to some images, it is the same rows for those images.
    some = {1, 3}
    part = observation_table(rec, some)
    assert set(zip(part.image_id.tolist(), part.point2D_idx.tolist(), part.point3D_id.tolist())) == {
        r for r in rows if r[0] in some
    }
    point_ids, row = table.points()
    assert np.array_equal(point_ids[row], table.point3D_id)
    assert len(point_ids) == rec.num_points3D()


def test_every_point_gets_the_mean_colour_of_its_keypoints(scene, tracks):
    rec, _ = initialize_reconstruction(simulated_prior(scene), scene.features, tracks, None)
    # Points added by re-triangulation in refinement start uncoloured; colouring the final model covers them.
    refine_reconstruction(rec, RefineConfig(rounds=2), verified=scene.verified, features=scene.features)
    color_points(rec, scene.features)
    for point_id in sorted(rec.point3D_ids())[::25]:
        point = rec.points3D[point_id]
        samples = [scene.features[e.image_id - 1].colors[e.point2D_idx] for e in point.track.elements]
        assert np.all(np.abs(point.color.astype(float) - np.mean(samples, axis=0)) <= 0.5 + 1e-9)
