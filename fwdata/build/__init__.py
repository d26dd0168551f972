"""`fwdata build`: the steps of a build (decode, clips, depth, sfm, align, points, write) and how they run."""
